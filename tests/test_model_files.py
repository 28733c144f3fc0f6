"""Model files: every accepted format loads weights-only and gives back the same network; pickles
need trust; each bad file gets an error that names it and says what is wrong."""

import pytest
import torch

from metanet.prune import prune_to_speedup, save_pruned
from zoo.arch import build_model, resnet_spec, vgg_spec
from zoo.model_files import ModelFileError, UntrustedPickleError, load_model, save_model

SPEC = resnet_spec(8, (4, 6, 8), in_channels=1, num_classes=10)
X = torch.randn(4, 1, 8, 8)


def _pruned():
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    prune_to_speedup(model, X[:1], 2.0)
    return model.eval()


def test_every_accepted_format_gives_back_the_same_outputs(tmp_path):
    model = _pruned()
    want = model(X)
    save_model(model, str(tmp_path / "ours.pt"), method="meta")
    torch.save({"arch": SPEC, "state_dict": build_model(SPEC).state_dict()}, tmp_path / "theirs.pt")
    save_pruned(model, str(tmp_path / "tp.pt"), arch=SPEC)
    loaded, meta = load_model(str(tmp_path / "ours.pt"))
    assert torch.equal(loaded(X), want) and meta["method"] == "meta" and not loaded.training
    loaded, _ = load_model(str(tmp_path / "tp.pt"))  # pruned widths restored onto the unpruned spec
    assert torch.equal(loaded(X), want)
    assert load_model(str(tmp_path / "theirs.pt"))[1]["format"] == "arch+state_dict"
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    from zoo.arch import arch_spec

    loaded, _ = load_model(str(tmp_path / "bare.pt"), arch=arch_spec(model))
    assert torch.equal(loaded(X), want)


def test_pickled_modules_need_trust(tmp_path):
    model = _pruned()
    torch.save(model, tmp_path / "pickled.pt")
    with pytest.raises(UntrustedPickleError, match="--trust-pickle"):
        load_model(str(tmp_path / "pickled.pt"))
    loaded, meta = load_model(str(tmp_path / "pickled.pt"), trust_pickle=True)
    assert torch.equal(loaded(X), model(X)) and meta["format"] == "pickled-module"


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ModelFileError, match="model file not found: .*nope.pt"):
        load_model(str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ModelFileError, match="junk.pt: not a readable PyTorch file"):
        load_model(str(tmp_path / "junk.pt"))
    torch.save(build_model(SPEC).state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ModelFileError, match="bare state dict without its architecture"):
        load_model(str(tmp_path / "bare.pt"))
    with pytest.raises(ModelFileError, match="does not fit architecture 'vgg'"):
        load_model(str(tmp_path / "bare.pt"), arch=vgg_spec(11, width_mult=0.125, input_size=8, in_channels=1))
    with pytest.raises(ModelFileError, match="unknown architecture family 'transformer'"):
        load_model(str(tmp_path / "bare.pt"), arch={"family": "transformer"})
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="not a model file: a dict with keys weights"):
        load_model(str(tmp_path / "other.pt"))
    save_pruned(_pruned(), str(tmp_path / "tp.pt"))
    with pytest.raises(ModelFileError, match="needs its unpruned architecture"):
        load_model(str(tmp_path / "tp.pt"))
