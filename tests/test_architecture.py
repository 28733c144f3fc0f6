"""The import layers (pyproject.toml, [tool.importlinter]): pipelines -> zoo -> metanet, distributed a
leaf. A wrong-way import fails here, with import-linter's report of the chain."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imports_run_one_way():
    out = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "4 kept, 0 broken" in out.stdout


def test_every_flag_has_a_help_line_with_its_default():
    sys.path.insert(0, str(ROOT / "pipelines"))
    import demo
    import make_zoo
    import meta_train
    import prune_batch
    import tune

    for module in (make_zoo, meta_train, prune_batch, tune, demo):
        parser = module.build_parser()
        assert parser.description, module.__name__
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help and "(default:" in action.help, f"{module.__name__} {action.option_strings}"
