"""The language models that write and judge explanations (explanations.py): a local transformers
causal LM (the packaged SmolLM2-135M-Instruct by default, offline), or a model behind an
OpenAI-compatible HTTP endpoint (vLLM, llama.cpp's server, ...) through the `openai` client.

Both write with greedy decoding and judge by P(Yes) against P(No) for the answer's first token: the
local model from its logits, the endpoint from the top log-probabilities it returns (or, where it
returns none, from its answer's text: 1 for Yes, 0 otherwise)."""

from __future__ import annotations

import logging
import math
import re
from typing import Protocol

import torch

from pipeline.errors import PipelineError
from pipeline.models import LoadedModel, left_padded, pad_id


class ExplainerError(PipelineError, RuntimeError):
    """The explainer model cannot be reached or used; the message says what to check."""


class LanguageModel(Protocol):
    identity: str
    """What the explanations depend on (a change re-explains)."""

    def write(self, messages: list[dict], max_tokens: int) -> str: ...

    def yes_probability(self, conversations: list[list[dict]]) -> list[float]: ...


def _first_line(text: str) -> str:
    """The answer's first line, without list numbering (small models continue the examples' list)."""
    return re.sub(r"^\d+[.)]\s*", "", text.strip().split("\n")[0].strip())


class LocalLanguageModel:
    """A transformers causal LM with a chat template, on its own device."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 8):
        tokenizer = loaded.tokenizer
        if not tokenizer.chat_template:
            raise ExplainerError(f"{loaded.model_id} has no chat template: choose an instruction-tuned model to explain with")
        self.loaded, self.batch_size = loaded, batch_size
        self.identity = f"{loaded.model_id}#{loaded.weights_hash[:12]}"
        self._answers = [tokenizer.encode(word, add_special_tokens=False)[0] for word in ("Yes", "No")]

    def _prompt(self, messages: list[dict]) -> list[int]:
        ids = self.loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    @torch.no_grad()
    def write(self, messages: list[dict], max_tokens: int) -> str:
        ids = torch.tensor([self._prompt(messages)], device=self.loaded.device)
        tokenizer = self.loaded.tokenizer
        out = self.loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                         do_sample=False, pad_token_id=pad_id(tokenizer))  # fmt: skip
        return _first_line(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))

    @torch.no_grad()
    def yes_probability(self, conversations: list[list[dict]]) -> list[float]:
        probabilities, pad = [], pad_id(self.loaded.tokenizer)
        for lo in range(0, len(conversations), self.batch_size):
            ids, mask, positions = left_padded([self._prompt(c) for c in conversations[lo : lo + self.batch_size]], pad)
            device = self.loaded.device
            logits = self.loaded.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       position_ids=positions.to(device), use_cache=False).logits  # fmt: skip
            pair = logits[:, -1, self._answers].float()  # [batch, (Yes, No)]
            probabilities += torch.softmax(pair, -1)[:, 0].tolist()
        return probabilities


class EndpointLanguageModel:
    """A model behind an OpenAI-compatible chat completions endpoint."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0):
        from openai import OpenAI

        for name in ("httpx", "httpx2"):  # the HTTP client logs every request at INFO: thousands of lines per run
            logging.getLogger(name).setLevel(logging.WARNING)
        self.client = OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=1)
        self.model, self.identity = model, f"{base_url}#{model}"
        self.base_url = base_url

    def _create(self, messages: list[dict], **kwargs):
        from openai import OpenAIError

        try:
            return self.client.chat.completions.create(model=self.model, messages=messages, temperature=0, **kwargs)
        except OpenAIError as err:
            raise ExplainerError(
                f"the explainer endpoint {self.base_url} (model {self.model!r}) failed: {err}; check that the server "
                "runs and serves that model (explain.endpoint, explain.endpoint_model, OPENAI_API_KEY)"
            ) from err

    def write(self, messages: list[dict], max_tokens: int) -> str:
        return _first_line(self._create(messages, max_tokens=max_tokens).choices[0].message.content or "")

    def yes_probability(self, conversations: list[list[dict]]) -> list[float]:
        return [self._yes(c) for c in conversations]

    def _yes(self, messages: list[dict]) -> float:
        choice = self._create(messages, max_tokens=1, logprobs=True, top_logprobs=5).choices[0]
        found = {}
        if choice.logprobs and choice.logprobs.content:
            for candidate in choice.logprobs.content[0].top_logprobs:
                word = candidate.token.strip().lower()
                if word in ("yes", "no") and word not in found:
                    found[word] = math.exp(candidate.logprob)
        if found:
            return found.get("yes", 0.0) / (found.get("yes", 0.0) + found.get("no", 0.0))
        return float((choice.message.content or "").strip().lower().startswith("yes"))
