"""Ship a metanetwork with the package (maintainers):

    python -m metanet.pretrained criterion runs/meta-shipped/criterion/metanetwork.pt --dataset cifar10 \\
        --trained-on "CIFAR-10 benchmark zoo (17 training members)" --command "python pipelines/meta_train.py ..." \\
        --measured "docs/benchmarks.md, 'The shipped metanetworks on networks they never saw'"
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
    args = p.parse_args(argv)
    try:
        entry = record(args.role, args.source, args.dataset, args.trained_on, args.command, args.measured)
    except (ShippedError, OSError, ValueError) as err:
        raise SystemExit(f"metanet.pretrained: {err}") from None
    print(f"shipped {entry.path} ({entry.sha256[:12]}...)")


if __name__ == "__main__":
    main()
