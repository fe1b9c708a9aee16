import json

import pytest
import torch

from pipeline.metrics import token_variance
from pipeline.optim import Signum, lr_multiplier
from pipeline.sae import Sae, SaeConfig, architectures, build_sae
from pipeline.sae.batchtopk import BALANCE_CLIP
from pipeline.sae.sparse import (
    CANDIDATES_PER_K,
    GATHER_DEAD_SHARE,
    bag_decode,
    batch_topk,
    dead_topk,
    sparse_decode,
    topk_encode,
)

D_IN = 24
ARCHS = sorted(a for a, cls in architectures().items() if not cls.transcodes)  # the SAEs (transcoders below)
BATCH_TOPK = ("batchtopk", "matryoshka_batchtopk")


def _sae(arch="topk", **kw):
    torch.manual_seed(0)
    sae = build_sae(SaeConfig(architecture=arch, expansion=4, k=6, **kw), D_IN)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def _naive_topk_loss(sae, x, dead, k_aux):
    """Dense reference: the same loss with autograd through a dense code matrix."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    values, idx = pre.topk(sae.cfg.k, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, values.clamp_min(0))
    x_hat = z @ sae.W_dec + sae.b_dec
    variance = token_variance(x)
    loss = (x_hat - x).pow(2).sum(1).mean() / variance
    aux_pre = pre.masked_fill(~dead, float("-inf"))
    aux_values, aux_idx = aux_pre.topk(min(k_aux, int(dead.sum())), dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, aux_idx, aux_values.clamp_min(0))
    scale = min(int(dead.sum()) / k_aux, 1.0)
    residual = (x - x_hat).detach()
    if sae.cfg.aux_rescale:  # to the input's variance: residual / sqrt(FVU)
        residual = residual * (variance / residual.pow(2).sum(1).mean()).sqrt()
    aux = scale * (z_aux @ sae.W_dec - residual).pow(2).sum(1).mean() / variance
    return loss + sae.cfg.aux_weight(sae.d_in) * aux, x_hat


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _training_step_gradients(sae, x, n_dead):
    """(training output, {parameter: gradient}, dead mask) of one training step with n_dead random
    latents dead; the gradients are cleared after."""
    dead = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
    dead[torch.randperm(sae.d_sae)[:n_dead]] = True
    out = sae.training_forward(x, dead, token_variance(x))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    return out, grads, dead


def test_auxk_uses_twice_k_dead_latents_unless_set():
    assert SaeConfig(k=16).aux_latents(576) == 32
    assert SaeConfig(k=16, k_aux=300).aux_latents(576) == 300
    assert SaeConfig(architecture="transcoder", k=16, skip=True).aux_latents(576) == 32


def test_auxk_weight_follows_the_architectures_rule_unless_set():
    assert SaeConfig(architecture="topk", k=64).aux_weight(576) == 0.25
    assert [SaeConfig(architecture="batchtopk", k=k).aux_weight(576) for k in (8, 16, 32, 64, 128)] == [0.5, 0.5, 0.5, 1.0, 2.0]
    assert SaeConfig(architecture="batchtopk", k=64, aux_coefficient=0.1).aux_weight(576) == 0.1
    assert SaeConfig(architecture="batchtopk", k=64, aux_coefficient=0.0).aux_weight(576) == 0.0


def test_matryoshka_auxk_weight_follows_the_expected_firing_rate():
    def weight(k, expansion=16, d_sae=None):
        return SaeConfig(architecture="matryoshka_batchtopk", k=k, expansion=expansion, d_sae=d_sae).aux_weight(576)

    # 2 where d_sae / k <= 200 (a latent expected to fire at least once in 200 tokens), else 0.25
    assert [weight(32, e) for e in (8, 16, 32)] == [2.0, 0.25, 0.25]
    assert [weight(64, e) for e in (8, 16, 32)] == [2.0, 2.0, 0.25]
    assert [weight(16, e) for e in (4, 8, 16)] == [2.0, 0.25, 0.25]
    assert weight(10, d_sae=2000) == 2.0 and weight(10, d_sae=2001) == 0.25  # d_sae, when set, over expansion


def test_saved_config_records_the_auxk_weight_it_trained_with(tmp_path):
    sae = build_sae(SaeConfig(architecture="batchtopk", k=4, expansion=2), 8)
    assert sae.config_dict()["aux_coefficient"] == 0.5


def test_auxk_of_a_transcoder_without_skip_uses_half_its_input_width():
    assert SaeConfig(architecture="transcoder", k=16).aux_latents(576) == 288
    assert SaeConfig(architecture="transcoder", k=16, k_aux=40).aux_latents(576) == 40


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aux_rescale", [True, False], ids=["rescaled", "gao"])
@pytest.mark.parametrize("n_dead", [0, 5, 60])
def test_sparse_topk_training_matches_dense_reference(n_dead, aux_rescale, device):
    sae = _sae(aux_rescale=aux_rescale).to(device)
    x = torch.randn(64, D_IN, device=device)
    out, fast, dead = _training_step_gradients(sae, x, n_dead)
    k_aux = sae.cfg.aux_latents(sae.d_in)
    if n_dead:
        ref_loss, ref_hat = _naive_topk_loss(sae, x, dead, k_aux)
    else:
        ref_loss, ref_hat = (sae.decode(sae.encode(x)) - x).pow(2).sum(1).mean() / token_variance(x), None
    ref_loss.backward()
    torch.testing.assert_close(out.loss, ref_loss)
    if ref_hat is not None:
        torch.testing.assert_close(out.x_hat, ref_hat)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, msg=name, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_dead", [1, 3, 10, int(GATHER_DEAD_SHARE * 40), 30, 40])
def test_auxk_finds_the_dead_latents_largest_pre_activations_at_any_share_of_dead(n_dead, device):
    torch.manual_seed(n_dead)
    pre = torch.randn(16, 40, device=device)
    dead = torch.zeros(40, dtype=torch.bool, device=device)
    dead[torch.randperm(40)[:n_dead]] = True
    ref_values, ref_idx = pre.masked_fill(~dead, float("-inf")).topk(min(8, n_dead), dim=1)
    values, idx = dead_topk(pre.clone(), dead, 8)
    order = values.argsort(1, descending=True)
    torch.testing.assert_close(values.gather(1, order), ref_values)
    torch.testing.assert_close(idx.gather(1, order), ref_idx)
    assert bool(dead[idx].all())
    kept = pre.clone()
    dead_topk(kept, dead, 8)  # without overwrite, pre is left as it was
    torch.testing.assert_close(kept, pre)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_kernels_against_dense(device):
    x, W, b, b_dec = (torch.randn(*shape, device=device) for shape in ((10, 8), (8, 30), (30,), (8,)))
    values, idx, _, _ = topk_encode(x, b_dec, W, b, 4)
    pre = (x - b_dec) @ W + b
    ref_values, _ = pre.topk(4, dim=1)
    torch.testing.assert_close(values.sort(1).values, ref_values.clamp_min(0).sort(1).values)
    W_dec = torch.randn(30, 8, device=device)
    z = torch.zeros(10, 30, device=device).scatter(1, idx, values)
    torch.testing.assert_close(sparse_decode(values, idx, W_dec), z @ W_dec)


def _naive_batch_topk_loss(sae, x, dead, k_aux):
    """Dense reference of BatchTopK / Matryoshka training: dense codes (chosen by ReLU(pre) times the
    selection weights, where balanced), prefixes and AuxK, autograd."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    weights = sae.selection_weights()
    scores = pre.relu() if weights is None else pre.relu() * weights
    flat = scores.flatten().topk(sae.cfg.k * len(x)).indices
    z = torch.zeros_like(pre).flatten().scatter(0, flat, pre.relu().flatten()[flat]).view_as(pre)
    variance = token_variance(x)
    fvus = [(x - z[:, :w] @ sae.W_dec[:w] - sae.b_dec).pow(2).sum(1).mean() / variance for w in sae.nested_widths()]
    loss, x_hat = torch.stack(fvus).mean(), z @ sae.W_dec + sae.b_dec
    if dead.any():
        aux_values, aux_idx = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, int(dead.sum())), dim=1)
        z_aux = torch.zeros_like(pre).scatter(1, aux_idx, aux_values.clamp_min(0))
        residual = (x - x_hat).detach()
        residual = residual * (variance / residual.pow(2).sum(1).mean()).sqrt()
        aux = min(int(dead.sum()) / k_aux, 1.0) * (z_aux @ sae.W_dec - residual).pow(2).sum(1).mean() / variance
        loss = loss + sae.cfg.aux_weight(sae.d_in) * aux
    return loss, x_hat, z


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("balance", [0.0, 0.5])
@pytest.mark.parametrize("n_dead", [0, 5, 60])
@pytest.mark.parametrize("arch", BATCH_TOPK)
def test_sparse_batch_topk_training_matches_dense_reference(arch, n_dead, balance, device):
    sae = _sae(arch, balance=balance).to(device)
    sae.firing_rate.uniform_(0, 2 * sae.cfg.k / sae.d_sae)  # rates far apart: the weights reorder the choice
    x = torch.randn(64, D_IN, device=device)
    x[3] *= 20  # a token far larger than the others takes more than CANDIDATES_PER_K * k latents
    out, fast, dead = _training_step_gradients(sae, x, n_dead)
    ref_loss, ref_hat, z = _naive_batch_topk_loss(sae, x, dead, sae.cfg.aux_latents(sae.d_in))
    ref_loss.backward()
    assert int((z[3] > 0).sum()) > CANDIDATES_PER_K * sae.cfg.k
    torch.testing.assert_close(out.loss, ref_loss)
    torch.testing.assert_close(out.x_hat, ref_hat)
    torch.testing.assert_close(out.fired, (z > 0).sum(0, dtype=torch.int32))
    torch.testing.assert_close(out.l0, (z > 0).sum(1).float().mean())
    for name, p in sae.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, msg=name, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_topk_finds_the_largest_entries_of_the_whole_batch(device):
    torch.manual_seed(0)
    pre = torch.randn(32, 200, device=device)
    pre[5, :150] += 10  # one row holds more than its candidates: more entries than n reach the floor
    pre[9] = 7.0  # ties at the boundary: any of them is a right answer
    for k in (1, 3, 20):
        values, flat = batch_topk(pre, k)
        ref_values, _ = pre.flatten().topk(k * len(pre))
        assert bool((flat[1:] > flat[:-1]).all())  # ascending, no duplicates
        torch.testing.assert_close(pre.flatten()[flat], values)
        torch.testing.assert_close(values.sort().values, ref_values.sort().values)


def test_bag_decode_sums_each_bags_entries_and_leaves_empty_bags_zero():
    W_dec = torch.randn(10, 4)
    values, bags, latents = torch.tensor([1.0, 2.0, -1.0, 0.5]), torch.tensor([0, 0, 2, 2]), torch.tensor([3, 7, 3, 1])
    expected = torch.stack([W_dec[3] + 2 * W_dec[7], torch.zeros(4), -W_dec[3] + 0.5 * W_dec[1], torch.zeros(4)])
    torch.testing.assert_close(bag_decode(values, bags, latents, W_dec, 4), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_a_bf16_autocast_training_step_follows_the_fp32_one(arch, device):
    """The step the train stage takes on GPU (bf16 matmuls, fp32 weights) against fp32: same loss
    and gradients up to bf16 rounding."""
    sae = _sae(arch, l1_coefficient=0.5, l0_coefficient=0.05).to(device)
    x = torch.randn(256, D_IN, device=device)
    dead = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    dead[:5] = True
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast(device, dtype=dtype, enabled=dtype == torch.bfloat16):
            out = sae.training_forward(x, dead, token_variance(x), 1.0)
        out.loss.backward()
        grads[dtype] = (float(out.loss.detach()), {n: p.grad.clone().flatten() for n, p in sae.named_parameters()})
        sae.zero_grad()
    (loss32, g32), (loss16, g16) = grads[torch.float32], grads[torch.bfloat16]
    assert loss16 == pytest.approx(loss32, rel=3e-2)
    for name, g in g32.items():
        if g.norm() > 0:
            assert torch.nn.functional.cosine_similarity(g16[name].float(), g, dim=0) > 0.98, name


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_decode_follow_the_contract(arch, tmp_path):
    sae = _sae(arch)
    x = torch.randn(16, D_IN)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    z = sae.encode(x)
    if arch == "topk":
        assert ((z != 0).sum(1) <= 6).all()
        kept = z != 0
        torch.testing.assert_close(z[kept], pre[kept])
    elif arch == "relu":
        torch.testing.assert_close(z, pre.relu())
    else:  # the threshold the dictionary saves
        torch.testing.assert_close(z, pre * (pre > sae.file_tensors()["threshold"]))
    torch.testing.assert_close(sae(x).x_hat, z @ sae.W_dec + sae.b_dec)

    sae.save(tmp_path)
    config = json.loads((tmp_path / "cfg.json").read_text())
    assert config["architecture"] == arch and config["d_in"] == D_IN and config["d_sae"] == 4 * D_IN
    loaded = Sae.load(tmp_path)
    assert type(loaded) is type(sae)
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)
    from safetensors.torch import load_file

    expected = {"W_enc", "b_enc", "W_dec", "b_dec"} | (
        {"threshold"} if arch in ("batchtopk", "jumprelu", "matryoshka_batchtopk") else set()
    )
    assert set(load_file(tmp_path / "sae.safetensors")) == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_folding_the_input_scale(arch):
    """An SAE trained on s * x, folded, gives on raw x the reconstruction divided by s."""
    sae, s = _sae(arch), 3.7
    if arch in BATCH_TOPK:
        sae.threshold.fill_(0.2)
    x = torch.randn(16, D_IN)
    scaled_hat = sae(x * s).x_hat
    sae.fold_input_scale(s)
    torch.testing.assert_close(sae(x).x_hat, scaled_hat / s, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_learns(arch):
    torch.manual_seed(1)
    basis = torch.randn(40, D_IN)
    codes = (torch.rand(2048, 40) < 0.08) * torch.rand(2048, 40) * 3
    data = codes @ basis
    sae = _sae(arch, l1_coefficient=0.5, l0_coefficient=0.05)
    sae.init_from_data(data[:512])
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    first = None
    for step in range(150):
        x = data[(step * 256) % 2048 :][:256]
        out = sae.training_forward(x, dead, token_variance(x), min(1.0, step / 20))
        out.loss.backward()
        sae.remove_parallel_decoder_grad()
        opt.step()
        opt.zero_grad()
        sae.normalize_decoder()
        first = first if first is not None else float(out.terms["fvu"])
    assert float(out.terms["fvu"]) < 0.5 * first and float(out.terms["fvu"]) < 0.3
    assert 0 < float(out.l0) < sae.d_sae / 2
    if arch in BATCH_TOPK:
        assert abs(float(out.l0) - 6) < 1e-4  # k per token on average over the batch


@pytest.mark.parametrize("arch", BATCH_TOPK)
def test_batchtopk_threshold_is_calibrated_to_k_latents_a_token(arch):
    """The threshold is the mean over batches of the smallest code the batch selection keeps, so that
    tokens like the sample's get k latents on average."""
    sae = _sae(arch)
    sample = torch.randn(4096 + 100, D_IN)  # 4 whole batches of 1024, then a partial one left out
    sae.calibrate(sample, batch_size=1024)
    with torch.no_grad():
        smallest = [batch_topk(sae.pre_acts(x), 6)[0].min() for x in sample[:4096].split(1024)]
        torch.testing.assert_close(sae.threshold, torch.full_like(sae.threshold, float(torch.stack(smallest).mean())))
        l0 = (sae.encode(torch.randn(8192, D_IN)) > 0).sum(1).float().mean()
    assert abs(float(l0) - 6) < 0.3


def test_balanced_thresholds_select_as_the_weighted_batch_selection_does():
    """With balanced selection each latent's threshold is the calibrated score over its weight: a
    rarely firing latent fires at a smaller code than a frequent one, and tokens still get k latents."""
    sae = _sae("batchtopk", balance=0.5)
    sae.firing_rate.copy_(torch.linspace(0.1, 2.0, sae.d_sae) * sae.cfg.k / sae.d_sae)
    sample = torch.randn(4096, D_IN)
    sae.calibrate(sample, batch_size=1024)
    weights = sae.selection_weights()
    with torch.no_grad():
        smallest = [batch_topk(sae.pre_acts(x) * weights, 6)[0].min() for x in sample.split(1024)]
        torch.testing.assert_close(sae.threshold * weights, torch.full_like(weights, float(torch.stack(smallest).mean())))
        l0 = (sae.encode(torch.randn(8192, D_IN)) > 0).sum(1).float().mean()
    assert float(sae.threshold[0]) < float(sae.threshold[-1])  # the rarest latent fires at the smallest code
    assert abs(float(l0) - 6) < 0.3


def test_selection_weights_favour_rare_latents_within_the_clip():
    sae = _sae("batchtopk", balance=0.25)
    mean = sae.cfg.k / sae.d_sae
    sae.firing_rate.fill_(mean)
    torch.testing.assert_close(sae.selection_weights(), torch.ones(sae.d_sae))  # equal rates: the plain selection
    sae.firing_rate[:3] = torch.tensor([0.0, mean / 1000, mean / 4])
    weights = sae.selection_weights()
    assert float(weights[0]) == float(weights[1]) == pytest.approx(BALANCE_CLIP**0.25, rel=0.01)  # clipped
    assert 1 < float(weights[2]) < float(weights[1]) and float(weights[3:].max()) < 1
    assert _sae("batchtopk", balance=0.0).selection_weights() is None
    assert _sae("matryoshka_batchtopk").selection_weights() is None  # nested: 0 by default


def test_firing_rates_follow_the_batches_over_a_horizon_in_firings_not_steps():
    """Rates move toward each batch's counts; a smaller batch moves them less a step, so that the
    same tokens move them as far whatever the batch size."""
    small, large = _sae("batchtopk"), _sae("batchtopk")
    counts = torch.zeros(small.d_sae, dtype=torch.int32)
    counts[0] = 1024  # latent 0 fires on every token, the others never
    for _ in range(8):
        small.observe_firing(counts // 4, 256)
    for _ in range(2):
        large.observe_firing(counts, 1024)
    torch.testing.assert_close(small.firing_rate, large.firing_rate)
    assert float(large.firing_rate[0]) > 0.5 and float(large.firing_rate[1:].max()) < 6 / 96
    for _ in range(200):
        large.observe_firing(counts, 1024)
    torch.testing.assert_close(large.firing_rate[0], torch.tensor(1.0))


def test_balance_is_for_batch_selection_only():
    with pytest.raises(ValueError, match=r"sae.balance=0.5 weighs BatchTopK's batch selection, but 'topk'"):
        SaeConfig(architecture="topk", balance=0.5)
    assert SaeConfig(architecture="topk", balance=0.0).balance_exponent(576) == 0.0
    assert SaeConfig(architecture="matryoshka_batchtopk", balance=0.5).balance_exponent(576) == 0.5
    assert SaeConfig(architecture="matryoshka_batchtopk", k=16, expansion=32).balance_exponent(576) == 0.0


def test_batchtopk_balances_where_an_average_latent_fires_rarely():
    """0.25 where d_sae / k >= 400 (an average latent fires less than once in 400 tokens), else 0."""

    def exponent(k, expansion=16, d_sae=None, balance=None):
        return SaeConfig(k=k, expansion=expansion, d_sae=d_sae, balance=balance).balance_exponent(576)

    assert [exponent(16, e) for e in (8, 16, 32)] == [0.0, 0.25, 0.25]
    assert [exponent(32, e) for e in (8, 16, 32)] == [0.0, 0.0, 0.25]
    assert [exponent(64, e) for e in (8, 16, 32)] == [0.0, 0.0, 0.0]
    assert exponent(10, d_sae=4000) == 0.25 and exponent(10, d_sae=3999) == 0.0  # d_sae, when set, over expansion
    assert exponent(64, balance=0.5) == 0.5  # set: as set


def test_decoder_constraints():
    sae = _sae()
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_decoder_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae))


def test_bad_configs():
    with pytest.raises(ValueError, match="k=200 must be smaller than d_sae=96"):
        build_sae(SaeConfig(k=200, expansion=4), D_IN)
    with pytest.raises(ValueError, match=r"sae.k_aux=96 \(AuxK's dead latents per token\) must be smaller than d_sae=96"):
        build_sae(SaeConfig(k=8, k_aux=96, expansion=4), D_IN)
    assert build_sae(SaeConfig(architecture="relu", k_aux=96, expansion=4), D_IN).d_sae == 96  # no AuxK there
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        SaeConfig(architecture="gated")
    with pytest.raises(FileNotFoundError, match="holds no cfg.json"):
        Sae.load("/nonexistent/sae")


def test_matryoshka_prefixes_each_reconstruct_on_their_own():
    """The loss is the mean over the nested prefixes of each one's FVU (plus AuxK), with the codes
    BatchTopK picks over the whole dictionary."""
    sae = _sae("matryoshka_batchtopk", matryoshka_widths=[12, 36, 96])
    x = torch.randn(64, D_IN)
    variance = token_variance(x)
    out = sae.training_forward(x, torch.zeros(sae.d_sae, dtype=torch.bool), variance)
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
    values, flat = pre.flatten().topk(6 * 64)
    z = torch.zeros_like(pre).flatten().scatter(0, flat, values).view_as(pre)
    fvus = [((x - z[:, :w] @ sae.W_dec[:w] - sae.b_dec).pow(2).sum(1).mean() / variance) for w in (12, 36, 96)]
    torch.testing.assert_close(out.loss, torch.stack(fvus).mean())
    torch.testing.assert_close(out.terms["fvu_12"], fvus[0])
    torch.testing.assert_close(out.terms["fvu"], fvus[2])
    assert _sae("matryoshka_batchtopk").nested_widths() == [6, 12, 24, 48, 96]  # d_sae / 16 ... d_sae


def test_matryoshka_widths_are_checked():
    with pytest.raises(ValueError, match=r"matryoshka_widths=\[12, 12, 96\] must be increasing"):
        build_sae(SaeConfig(architecture="matryoshka_batchtopk", expansion=4, k=6, matryoshka_widths=[12, 12, 96]), D_IN)
    with pytest.raises(ValueError, match="ending at d_sae=96"):
        build_sae(SaeConfig(architecture="matryoshka_batchtopk", expansion=4, k=6, matryoshka_widths=[12, 48]), D_IN)
    with pytest.raises(ValueError, match="only sae=matryoshka_batchtopk uses it"):
        build_sae(SaeConfig(architecture="topk", expansion=4, k=6, matryoshka_widths=[12, 96]), D_IN)


def test_jumprelu_threshold_gets_gradient_from_the_l0_penalty():
    sae = _sae("jumprelu", l0_coefficient=1.0, jumprelu_bandwidth=1.0)
    x = torch.randn(64, D_IN)
    out = sae.training_forward(x, torch.zeros(sae.d_sae, dtype=torch.bool), token_variance(x))
    out.loss.backward()
    assert sae.log_threshold.grad is not None and sae.log_threshold.grad.abs().sum() > 0


# ---------------------------------------------------------------- transcoders


def _transcoder(skip: bool):
    sae = _sae("transcoder", skip=skip)
    if skip:
        with torch.no_grad():
            sae.W_skip.normal_(0, 0.1)
    return sae


def _mlp_like(n=2048, seed=1):
    """x and y = sparse features of x read out in another basis + a linear map of x (an MLP's two parts)."""
    gen = torch.Generator().manual_seed(seed)
    basis_in, basis_out = torch.randn(40, D_IN, generator=gen), torch.randn(40, D_IN, generator=gen)
    codes = (torch.rand(n, 40, generator=gen) < 0.08) * torch.rand(n, 40, generator=gen) * 3
    x = codes @ basis_in + 0.1 * torch.randn(n, D_IN, generator=gen)
    return x, codes @ basis_out + x @ torch.randn(D_IN, D_IN, generator=gen) * 0.3


@pytest.mark.parametrize("skip", [False, True])
def test_a_transcoder_predicts_its_target_as_written(skip, tmp_path):
    """pre = x W_enc + b_enc (no b_dec), TopK codes, y_hat = z W_dec + b_dec (+ x W_skip); the training
    loss is the FVU of the target (checked against dense autograd) plus AuxK; saved and loaded whole."""
    sae = _transcoder(skip)
    x, y = torch.randn(64, D_IN), torch.randn(64, D_IN)
    pre = x @ sae.W_enc + sae.b_enc
    values, idx = pre.topk(6, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, values.clamp_min(0))
    y_ref = z @ sae.W_dec + sae.b_dec + (x @ sae.W_skip if skip else 0)
    torch.testing.assert_close(sae.encode(x), z)
    torch.testing.assert_close(sae(x).x_hat, y_ref)
    no_dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    out = sae.training_forward(x, no_dead, token_variance(y), 1.0, y)
    reference = (y_ref - y).pow(2).sum(1).mean() / token_variance(y)
    torch.testing.assert_close(out.loss, reference)
    out.loss.backward()
    fast = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    reference.backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="pass the output hook's activations"):
        sae.training_forward(x, no_dead, token_variance(y))
    loaded = Sae.load(sae.save(tmp_path))
    assert loaded.transcodes and loaded.cfg.skip == skip
    torch.testing.assert_close(loaded(x).x_hat, y_ref)


@pytest.mark.parametrize("skip", [False, True])
def test_folding_a_transcoders_two_scales(skip):
    """Trained to map s_in x to s_out y, folded: raw x to raw y (the decoder rows stay unit norm)."""
    sae, s_in, s_out = _transcoder(skip), 3.7, 0.4
    x = torch.randn(16, D_IN)
    scaled_hat = sae(x * s_in).x_hat
    sae.fold_input_scale(s_in, s_out)
    torch.testing.assert_close(sae(x).x_hat, scaled_hat / s_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae))


def test_transcoders_learn_and_the_skip_term_takes_the_linear_part():
    x, y = _mlp_like()
    fvus = {}
    for skip in (False, True):
        sae = _sae("transcoder", skip=skip)
        sae.init_from_data(y[:512], x[:512])
        opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
        dead = torch.zeros(sae.d_sae, dtype=torch.bool)
        for step in range(200):
            batch = slice((step * 256) % 2048, (step * 256) % 2048 + 256)
            out = sae.training_forward(x[batch], dead, token_variance(y[batch]), 1.0, y[batch])
            out.loss.backward()
            sae.remove_parallel_decoder_grad()
            opt.step()
            opt.zero_grad()
            sae.normalize_decoder()
        fvus[skip] = float(out.terms["fvu"])
    assert fvus[False] < 0.4 and fvus[True] < 0.8 * fvus[False]


def test_a_transcoders_encoder_starts_as_its_decoder_pulled_back_through_the_linear_map():
    """With y = x A + c, latent i's encoder column starts along A d_i (unit norm), its pre-activation
    centred on the mean input; for y = x it is an SAE's init, W_enc = W_dec^T."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, D_IN, generator=gen) + 3.0
    for a in (torch.eye(D_IN), torch.randn(D_IN, D_IN, generator=gen)):
        sae = _sae("transcoder")
        sae.init_from_data(x @ a + 1.0, x)
        pulled = a @ sae.W_dec.detach().t()
        torch.testing.assert_close(sae.W_enc.detach(), pulled / pulled.norm(dim=0, keepdim=True), atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(sae.pre_acts(x).mean(0), torch.zeros(sae.d_sae), atol=1e-4, rtol=0)


def test_skip_is_for_transcoders_only():
    with pytest.raises(ValueError, match="sae.skip=true adds a skip term to a transcoder, but this is 'topk'"):
        SaeConfig(architecture="topk", skip=True)
    assert SaeConfig(architecture="transcoder", skip=True).default_name() == "transcoder-skip-k32-x16"


def test_signum_and_schedule():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Signum([p], lr=0.1)
    p.grad = torch.tensor([1.0, -2.0, 0.0])
    opt.step()
    opt.eval_params()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.1, 0.0]))


def test_signum_steps_scaled_entries_that_much_farther():
    p = torch.nn.Parameter(torch.zeros(2, 3))
    opt = Signum([p], lr=0.1)
    opt.lr_scales = {p: torch.tensor([[1.0, 3.0, 1.0]])}  # one column moves 3x as far
    p.grad = torch.tensor([[1.0, -1.0, 0.0], [-2.0, 2.0, 1.0]])
    opt.step()
    torch.testing.assert_close(opt.state[p]["z"], torch.tensor([[-0.1, 0.3, 0.0], [0.1, -0.3, -0.1]]))


def test_signum_average_weights_step_t_by_t_to_the_power():
    """The saved average of iterates z_1..z_T is sum_t w_t z_t / sum_t w_t with w_t = t^power lr_t^2:
    uniform at power 0 (sparsify's), later steps heavier above it."""
    lrs, grads = [0.05, 0.1, 0.1, 0.1], [1.0, -1.0, -1.0, 1.0]
    for power in (0.0, 3.0):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = Signum([p], lr=1.0, power=power)
        iterates, weights, z = [], [], 0.0
        for t, (lr, g) in enumerate(zip(lrs, grads, strict=True), start=1):
            opt.param_groups[0]["lr"] = lr
            p.grad = torch.tensor([g])
            opt.step()
            z -= lr * g
            iterates.append(z)
            weights.append(t**power * lr * lr)
        opt.eval_params()
        expected = sum(w * zt for w, zt in zip(weights, iterates, strict=True)) / sum(weights)
        assert p.item() == pytest.approx(expected, abs=1e-6)


def test_signum_resumes_a_checkpoint_from_before_the_weighting():
    """Optimizer state saved when the uniform average's sum was `lr_sq_sum` goes on exactly as a power-0 run."""

    def run(steps, opt=None, p=None):
        p = p if p is not None else torch.nn.Parameter(torch.zeros(2))
        opt = opt or Signum([p], lr=0.1)
        for g in steps:
            p.grad = torch.tensor(g)
            opt.step()
        return p, opt

    grads = [[1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [1.0, 1.0]]
    straight, _ = run(grads)
    p, opt = run(grads[:2])
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group["lr_sq_sum"] = group.pop("weight_sum")
        del group["power"], group["steps"]
    q = torch.nn.Parameter(p.detach().clone())
    fresh = Signum([q], lr=0.1)
    fresh.load_state_dict(saved)
    resumed, _ = run(grads[2:], fresh, q)
    torch.testing.assert_close(resumed.detach(), straight.detach())
    assert lr_multiplier(0, 100, 10, "linear", 0.5) == pytest.approx(0.1)
    assert lr_multiplier(40, 100, 10, "linear", 0.5) == 1.0
    assert lr_multiplier(75, 100, 10, "linear", 0.5) == pytest.approx(0.5)
    assert lr_multiplier(75, 100, 10, "cosine", 0.5) == pytest.approx(0.5)
