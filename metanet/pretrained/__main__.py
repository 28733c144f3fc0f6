"""Ship a metanetwork with the package (maintainers):

    python -m metanet.pretrained criterion runs/meta-shipped/criterion/metanetwork.pt --dataset cifar10 \\
        --trained-on "CIFAR-10 benchmark zoo (17 training members)" --command "python pipelines/meta_train.py ..." \\
        --measured "docs/benchmarks.md, 'The shipped metanetworks on networks they never saw'" \\
        --seen seen.txt

``--seen``: the lineages of the members it learned from or was chosen on, one a line, so that no
benchmark evaluates it on them under another id (``zoo.store.lineages``):

    python -c "from zoo.store import Zoo, lineages; print(*lineages(Zoo('runs/zoo-cifar10-bench-40'), ('train', 'val')), sep='\\n')" > seen.txt
"""

import argparse

from metanet.pretrained import SERVES, ShippedError, record


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", choices=sorted(SERVES))
    p.add_argument("source", help="the metanetwork file meta_train.py wrote")
    p.add_argument("--dataset", required=True, help="the dataset it was meta-trained on: names the file (ROLE-DATASET.pt)")
    p.add_argument("--trained-on", required=True, help="the zoo it was meta-trained on, in words")
    p.add_argument("--command", required=True, help="the command that trained it")
    p.add_argument("--measured", required=True, help="where its numbers on unseen networks are")
    p.add_argument("--seen", help="a file of the lineages of the members it learned from or was chosen on")
    args = p.parse_args(argv)
    try:
        seen = open(args.seen).read().split() if args.seen else ()
        entry = record(args.role, args.source, args.dataset, args.trained_on, args.command, args.measured, seen)
    except (ShippedError, OSError, ValueError) as err:
        raise SystemExit(f"metanet.pretrained: {err}") from None
    print(f"shipped {entry.path} ({entry.sha256[:12]}...)")


if __name__ == "__main__":
    main()
