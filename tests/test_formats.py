"""SAELens / sparsify interchange, checked against reference computations written from each format's
published encode/decode math (independent of the converters under test)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.sae import Sae, SaeConfig, architectures, build_sae
from pipeline.sae.convert import main as convert_main
from pipeline.sae.formats import FormatError, detect_format, write_saelens, write_sparsify

D_IN = 12
ARCHS = sorted(architectures())
SAE_ARCHS = [a for a in ARCHS if not architectures()[a].transcodes]  # what SAELens' SAE formats hold


def _sae(arch, skip=False):
    torch.manual_seed(0)
    meta = {"model_id": "m", "hook": "blocks.3.resid_post"}
    if arch == "transcoder":
        meta = {"model_id": "m", "hook": "blocks.3.mlp_in", "hook_out": "blocks.3.mlp_out"}
    sae = build_sae(SaeConfig(architecture=arch, expansion=4, k=5, skip=skip), D_IN, meta)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.2)
        if skip:
            sae.W_skip.normal_(0, 0.2)
        if sae.has_threshold:
            sae.threshold.uniform_(0.05, 0.3)
            if arch == "jumprelu":
                sae.log_threshold.copy_(sae.threshold.log())
    return sae


def saelens_reference(directory, x):
    """SAELens v6 inference: process_sae_in, encode per architecture, decode."""
    cfg = json.loads((directory / "cfg.json").read_text())
    t = load_file(directory / "sae_weights.safetensors")
    pre = (x - t["b_dec"] * cfg.get("apply_b_dec_to_input", True)) @ t["W_enc"] + t["b_enc"]
    norms = t["W_dec"].norm(dim=-1)
    if cfg["architecture"] == "standard":
        z = pre.relu()
    elif cfg["architecture"] == "jumprelu":
        z = pre.relu() * (pre > t["threshold"])
    else:
        rescale = cfg.get("rescale_acts_by_decoder_norm", False)
        scored = pre * norms if rescale else pre
        values, idx = scored.topk(cfg["k"], dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, values.relu())
        if rescale:
            z = z / norms
    return z, z @ t["W_dec"] + t["b_dec"]


def sparsify_reference(directory, x):
    """sparsify SparseCoder: ReLU(encoder(x - b_dec)) (a transcoder: of x), top-k, dense decode, + x W_skip^T."""
    cfg = json.loads((directory / "cfg.json").read_text())
    t = load_file(directory / "sae.safetensors")
    x_in = x if cfg["transcode"] else x - t["b_dec"]
    pre = torch.nn.functional.linear(x_in, t["encoder.weight"], t["encoder.bias"]).relu()
    values, idx = pre.topk(cfg["k"], dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, values)
    out = z @ t["W_dec"] + t["b_dec"]
    return z, out + x @ t["W_skip"].T if cfg["skip_connection"] else out


@pytest.mark.parametrize("arch", SAE_ARCHS)
def test_saelens_both_ways(arch, tmp_path):
    sae, x = _sae(arch), torch.randn(32, D_IN)
    write_saelens(sae, tmp_path / "lens")
    assert detect_format(tmp_path / "lens") == "saelens"
    z_ref, x_ref = saelens_reference(tmp_path / "lens", x)
    z, x_hat = sae.encode(x), sae(x).x_hat
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(x_hat, x_ref)
    back = Sae.load(tmp_path / "lens")
    assert back.meta["hook"] == "blocks.3.resid_post" and back.meta["model_id"] == "m"
    torch.testing.assert_close(back.encode(x), z)
    torch.testing.assert_close(back(x).x_hat, x_hat)


def test_saelens_options_are_folded_into_the_weights(tmp_path):
    """apply_b_dec_to_input=false, rescale_acts_by_decoder_norm, non-unit decoder rows, negative thresholds."""
    torch.manual_seed(3)
    d_sae = 40
    t = {"W_enc": torch.randn(D_IN, d_sae), "b_enc": torch.randn(d_sae) * 0.3,
         "W_dec": torch.randn(d_sae, D_IN) * torch.rand(d_sae, 1) * 2, "b_dec": torch.randn(D_IN)}  # fmt: skip
    x = torch.randn(64, D_IN)
    for name, cfg, extra in [
        (
            "topk",
            {
                "architecture": "topk",
                "k": 6,
                "rescale_acts_by_decoder_norm": True,
                "apply_b_dec_to_input": False,
            },
            {},
        ),
        (
            "jumprelu",
            {"architecture": "jumprelu", "apply_b_dec_to_input": False},
            {"threshold": torch.randn(d_sae) * 0.5},
        ),
        ("standard", {"architecture": "standard", "apply_b_dec_to_input": True}, {}),
    ]:
        directory = tmp_path / name
        directory.mkdir()
        save_file({**t, **extra}, directory / "sae_weights.safetensors")
        (directory / "cfg.json").write_text(
            json.dumps(
                {
                    **cfg,
                    "d_in": D_IN,
                    "d_sae": d_sae,
                    "metadata": {"sae_lens_version": "6.1.0", "hook_name": "blocks.2.hook_mlp_out"},
                }
            )
        )
        sae = Sae.load(directory)
        z_ref, x_ref = saelens_reference(directory, x)
        torch.testing.assert_close(sae(x).x_hat, x_ref, atol=1e-5, rtol=1e-4)
        assert sae.meta["hook"] == "blocks.2.mlp_out"
        if name != "topk":  # topk codes are rescaled by the decoder norms, reconstructions are not
            torch.testing.assert_close(sae.encode(x), z_ref, atol=1e-5, rtol=1e-4)


def test_sparsify_both_ways(tmp_path):
    sae, x = _sae("topk"), torch.randn(32, D_IN)
    write_sparsify(sae, tmp_path / "sp")
    assert detect_format(tmp_path / "sp") == "sparsify"
    z_ref, x_ref = sparsify_reference(tmp_path / "sp", x)
    torch.testing.assert_close(sae.encode(x), z_ref)
    torch.testing.assert_close(sae(x).x_hat, x_ref)
    back = Sae.load(tmp_path / "sp")
    torch.testing.assert_close(back(x).x_hat, sae(x).x_hat)
    with pytest.raises(FormatError, match="TopK SAEs and transcoders only"):
        write_sparsify(_sae("relu"), tmp_path / "no")


@pytest.mark.parametrize("skip", [False, True])
def test_transcoders_go_to_sparsify_and_back(skip, tmp_path):
    """A transcoder (with its skip term) computes what sparsify's does from the written files; saved
    under sparsify's hookpoint name `layers.<L>.mlp`, it reads back with its hooks."""
    sae, x = _sae("transcoder", skip), torch.randn(32, D_IN)
    directory = write_sparsify(sae, tmp_path / "layers.3.mlp")
    z_ref, y_ref = sparsify_reference(directory, x)
    torch.testing.assert_close(sae.encode(x), z_ref)
    torch.testing.assert_close(sae(x).x_hat, y_ref)
    back = Sae.load(directory)
    assert back.transcodes and back.cfg.skip == skip
    assert (back.meta["hook"], back.meta["hook_out"]) == ("blocks.3.mlp_in", "blocks.3.mlp_out")
    torch.testing.assert_close(back(x).x_hat, y_ref)


def test_transcoders_do_not_go_to_saelens(tmp_path):
    with pytest.raises(FormatError, match="export it to sparsify instead"):
        write_saelens(_sae("transcoder"), tmp_path / "lens")


def test_hook_names_in_transformerlens_spelling(tmp_path):
    """What the MLP reads is TransformerLens' ln2.hook_normalized; its hook_mlp_in is before the norm."""
    sae = build_sae(SaeConfig(expansion=2, k=2), D_IN, {"hook": "blocks.1.mlp_in"})
    write_saelens(sae, tmp_path / "lens")
    assert json.loads((tmp_path / "lens" / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.1.ln2.hook_normalized"
    assert Sae.load(tmp_path / "lens").meta["hook"] == "blocks.1.mlp_in"
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.1.hook_mlp_in"
    (tmp_path / "lens" / "cfg.json").write_text(json.dumps(cfg))
    assert Sae.load(tmp_path / "lens").meta["hook"] == "blocks.1.resid_mid"


def test_convert_command_line(tmp_path, capsys):
    sae, x = _sae("topk"), torch.randn(8, D_IN)
    sae.save(tmp_path / "ours")
    assert convert_main(["--to", "saelens", str(tmp_path / "ours"), str(tmp_path / "lens")]) == 0
    assert convert_main(["--from", "saelens", str(tmp_path / "lens"), str(tmp_path / "again")]) == 0
    assert detect_format(tmp_path / "again") == "native"
    torch.testing.assert_close(Sae.load(tmp_path / "again")(x).x_hat, sae(x).x_hat)
    assert convert_main(["--to", "sparsify", str(tmp_path / "ours"), str(tmp_path / "sp")]) == 0
    assert convert_main(["--from", "sparsify", str(tmp_path / "sp"), str(tmp_path / "sp-back")]) == 0

    cfg = json.loads((tmp_path / "sp" / "cfg.json").read_text())
    (tmp_path / "sp" / "cfg.json").write_text(json.dumps({**cfg, "activation": "groupmax"}))
    assert convert_main(["--from", "sparsify", str(tmp_path / "sp"), str(tmp_path / "x")]) == 1
    assert "groupmax" in capsys.readouterr().err
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    (tmp_path / "lens" / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    assert convert_main(["--from", "saelens", str(tmp_path / "lens"), str(tmp_path / "y")]) == 1
    assert convert_main(["--from", "saelens", str(tmp_path / "missing"), str(tmp_path / "z")]) == 1


def test_unreadable_files_are_named(tmp_path):
    directory = _sae("topk").save(tmp_path / "garbage")
    (directory / "cfg.json").write_text("{not json")
    with pytest.raises(FormatError, match=f"{directory / 'cfg.json'} is not valid JSON"):
        Sae.load(directory)
    directory = _sae("topk").save(tmp_path / "pickle")
    (directory / "sae.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle under that name
    with pytest.raises(FormatError, match=f"{directory / 'sae.safetensors'} is not a readable safetensors file"):
        Sae.load(directory)
