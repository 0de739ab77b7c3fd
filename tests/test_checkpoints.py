"""Checkpoint loading: torchvision and original RAFT formats, the I3D port, refusals with key names."""

from __future__ import annotations

import re

import pytest
import torch

from models.bundle.load import load_bundle
from models.errors import BundleError
from models.nets.checkpoints import load_i3d_weights, load_raft_weights, read_state_dict
from models.nets.flow import build_raft
from models.nets.i3d import build_i3d


def to_original_release(state: dict, arch: str) -> dict:
    """torchvision RAFT names -> the original release's, written out independently of the loader."""
    out = {}
    for key, value in state.items():
        k = key
        k = k.replace("feature_encoder.", "fnet.").replace("context_encoder.", "cnet.")
        k = re.sub(r"^(fnet|cnet)\.convnormrelu\.0\.", r"\1.conv1.", k)
        k = re.sub(r"^(fnet|cnet)\.convnormrelu\.1\.", r"\1.norm1.", k)
        k = re.sub(r"^(fnet|cnet)\.conv\.", r"\1.conv2.", k)
        k = re.sub(r"\.convnormrelu(\d)\.0\.", r".conv\1.", k)
        k = re.sub(r"\.convnormrelu(\d)\.1\.", r".norm\1.", k)
        k = k.replace("update_block.motion_encoder.convcorr", "update_block.encoder.convc")
        k = k.replace("update_block.motion_encoder.convflow", "update_block.encoder.convf")
        k = k.replace("update_block.motion_encoder.conv.0.", "update_block.encoder.conv.")
        k = re.sub(r"update_block\.encoder\.conv([cf]\d)\.0\.", r"update_block.encoder.conv\1.", k)
        if arch == "raft_large":
            k = re.sub(r"update_block\.recurrent_block\.convgru(\d)\.conv([zrq])\.", r"update_block.gru.conv\2\1.", k)
        else:
            k = re.sub(r"update_block\.recurrent_block\.convgru1\.conv([zrq])\.", r"update_block.gru.conv\1.", k)
        k = k.replace("mask_predictor.convrelu.0.", "update_block.mask.0.").replace(
            "mask_predictor.conv.", "update_block.mask.2."
        )
        out["module." + k] = value
        # the original registers the downsample norm twice: as normN and as downsample.1
        m = re.match(r"^(fnet|cnet)\.(layer\d\.\d)\.downsample\.1\.(.*)$", k)
        if m:
            convs = 3 if arch == "raft_small" else 2
            out[f"module.{m.group(1)}.{m.group(2)}.norm{convs + 1}.{m.group(3)}"] = value
    return out


@pytest.mark.parametrize("arch", ["raft_small", "raft_large"])
def test_original_release_format_loads_identically(arch):
    torch.manual_seed(0)
    source = build_raft(arch)
    source.context_encoder.apply(lambda m: m.running_mean.uniform_() if isinstance(m, torch.nn.BatchNorm2d) else None)
    target = build_raft(arch)
    load_raft_weights(target, to_original_release(source.state_dict(), arch), fmt="original")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_torchvision_format_with_module_prefix(tmp_path):
    source = build_raft("raft_small")
    path = tmp_path / "raft.pth"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)
    target = build_raft("raft_small")
    load_raft_weights(target, read_state_dict(path))
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())


def test_missing_and_unexpected_keys_are_named():
    state = build_raft("raft_small").state_dict()
    state.pop("update_block.flow_head.conv2.weight")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(BundleError, match=r"1 missing: update_block\.flow_head\.conv2\.weight.*1 unexpected: extra"):
        load_raft_weights(build_raft("raft_small"), state)


def test_wrong_architecture_is_refused():
    with pytest.raises(BundleError, match="wrong shape|missing"):
        load_raft_weights(build_raft("raft_small"), build_raft("raft_large").state_dict())


def test_i3d_port_checkpoint_with_module_prefix():
    source = build_i3d(10, width=0.25)
    target = build_i3d(10, width=0.25)
    load_i3d_weights(target, {"module." + k: v for k, v in source.state_dict().items()})
    assert torch.equal(target.state_dict()["logits.conv3d.weight"], source.state_dict()["logits.conv3d.weight"])
    with pytest.raises(BundleError, match="wrong shape"):
        load_i3d_weights(build_i3d(11, width=0.25), source.state_dict())


def test_pickled_code_is_not_executed(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(1), "payload": print}, path)
    with pytest.raises(BundleError, match="cannot read checkpoint"):
        read_state_dict(path)


def test_bundle_refuses_tampered_weights(random_bundle, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(random_bundle, copy)
    assert load_bundle(copy).meta.name == "random-test"
    with open(copy / "classifier.pth", "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(copy)
    (copy / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="invalid JSON"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path / "nowhere")


def test_bundle_create_records_flow_conventions_and_port_pooling(tmp_path, capsys):
    """`bundle create` flags for the flow normalisation, channel order, RAFT updates and the I3D head:
    the loaded pipeline computes with exactly those (checked against a hand-written reference)."""
    import json

    from models.bundle.load import make_random_bundle
    from service.cli import main

    src = make_random_bundle(tmp_path / "src", frames=3, num_classes=3, i3d_width=0.125)
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    common = ["bundle", "create", "--raft", str(src / "flow.pth"), "--i3d", str(src / "classifier.pth")]
    # 25 frames: 24 flows, 3 time steps after I3D's pooling, weighted 1, 2, 1 by the port's head.
    common += ["--labels", str(tmp_path / "labels.txt"), "--frames", "25", "--size", "64", "--corr-levels", "3"]
    common += ["--name", "conv", "--version", "1"]
    flags = ["--flow-clamp", "4", "--flow-scale", "8", "--flow-channel-order", "yx", "--updates-infer", "5"]
    assert main([*common, *flags, "--updates-grad", "3", "--out", str(tmp_path / "b")]) == 0
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert meta["flow_normalisation"] == {"clamp": 4.0, "scale": 8.0, "channel_order": "yx"}
    assert (meta["flow"]["updates_infer"], meta["flow"]["updates_grad"]) == (5, 3)
    assert meta["classifier"]["temporal_pool"] == "port"  # imported checkpoints: the port's head

    pipeline = load_bundle(tmp_path / "b").pipeline
    assert pipeline.classifier.temporal_pool == "port"
    clip = torch.rand(1, 25, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        flows = pipeline.flow_model(clip, num_flow_updates=5)["forward"]
        x = (flows.clamp(-4, 4) / 8).flip(2).permute(0, 2, 1, 3, 4)  # yx: channel 0 vertical
        features = pipeline.classifier.features(x)
        pooled = torch.nn.functional.avg_pool3d(features, (2, *features.shape[3:]), stride=1)
        expected = pipeline.classifier.logits(pooled).flatten(2).mean(2)
        assert torch.allclose(pipeline.predict(clip, defend=False).logits, expected, atol=1e-5)

    assert main([*common, "--temporal-pool", "mean", "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "bundle.json").read_text())["classifier"]["temporal_pool"] == "mean"
    assert main([*common, "--flow-scale", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "invalid bundle options" in capsys.readouterr().err and not (tmp_path / "bad").exists()
