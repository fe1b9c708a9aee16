import torch

from pipeline.attribution import encoder_terms
from pipeline.hooks import capture_activations, validate_hooks
from pipeline.sae import Sae
from pipeline.synthesis import SynthesisSettings, synthesize

HOOK = "blocks.1.resid_post"


def _pre(loaded, hook, sae, latent, ids, bos):
    w, b = encoder_terms(sae, latent)
    x = capture_activations(loaded.model, torch.tensor([[bos, *ids]]), [hook])[hook.name]
    return float(x[0, -1].float() @ w + b)


def test_the_search_raises_the_feature_and_never_uses_banned_tokens(trained_run, loaded):
    sae = Sae.load(trained_run / "sae" / HOOK / "topk-k8-x4")
    hook = validate_hooks(loaded.model, [HOOK])[0]
    bos = loaded.tokenizer.bos_token_id
    start = torch.tensor([5, 6, 7, 8, 9, 10])
    banned = torch.zeros(loaded.model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
    banned[:40] = True  # the start's own tokens among them: swaps may only bring allowed ones
    settings = SynthesisSettings(steps=15, candidates=32, top_tokens=8, fluency=0.0, seconds=60)
    found = synthesize(loaded.model, hook, sae, 3, start, bos, banned, settings)
    assert len(found.ids) == 6 and found.steps == 15
    assert all(t == s or t >= 40 for t, s in zip(found.ids, start.tolist(), strict=True))
    assert _pre(loaded, hook, sae, 3, found.ids, bos) > _pre(loaded, hook, sae, 3, start.tolist(), bos)
    with torch.no_grad():
        x = capture_activations(loaded.model, torch.tensor([[bos, *found.ids]]), [hook])[hook.name]
        assert found.activation == float(sae.encode(x[0, -1:].float())[0, 3])
    quick = synthesize(loaded.model, hook, sae, 3, start, bos, banned, SynthesisSettings(steps=50, seconds=0.0))
    assert quick.steps == 1  # the time bound stops the search
