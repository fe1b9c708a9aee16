import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from transformers import AutoTokenizer

from pipeline.explainers import EndpointLanguageModel, ExplainerError, LocalLanguageModel
from pipeline.models import ModelConfig, load_model

TEMPLATE = ("{% for m in messages %}<bos>{{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<bos>{% endif %}")  # fmt: skip


def chat_model_dir(model_dir, to):
    """A copy of a tiny model whose tokenizer has a chat template (what an explainer needs)."""
    shutil.copytree(model_dir, to)
    tokenizer = AutoTokenizer.from_pretrained(to)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(to)
    return to


@pytest.fixture(scope="module")
def local(model_cfg, tmp_path_factory):
    path = chat_model_dir(model_cfg.path, tmp_path_factory.mktemp("explainer") / "model")
    return LocalLanguageModel(load_model(ModelConfig(path=str(path), dtype="float32", device="cpu")), batch_size=4)


def _ask(text):
    return [{"role": "user", "content": text}]


def test_a_prompt_judged_in_a_padded_batch_gets_what_it_gets_alone(local):
    short, long = _ask("def f"), _ask("return the value of the attribute " * 3)
    alone = local.yes_probability([short])[0]
    batched = local.yes_probability([long, short, long])
    assert 0 < alone < 1 and batched[1] == pytest.approx(alone, abs=1e-5) and batched[0] == pytest.approx(batched[2])


def test_the_local_model_writes_one_line(local):
    text = local.write(_ask("What does it detect?"), max_tokens=8)
    assert isinstance(text, str) and "\n" not in text and local.identity.count("#") >= 1


def test_a_model_without_chat_template_is_refused(loaded):
    with pytest.raises(ExplainerError, match="no chat template"):
        LocalLanguageModel(loaded)


class _Completions(BaseHTTPRequestHandler):
    """Speaks enough of the chat completions API: an answer, and top log-probabilities when asked."""

    seen: list = []

    def do_POST(self):  # noqa: N802 (the http.server name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(body)
        logprobs = None
        if body.get("logprobs"):
            top = [{"token": "Yes", "logprob": -0.5, "bytes": None}, {"token": " no", "logprob": -1.5, "bytes": None}]
            logprobs = {"content": [{"token": "Yes", "logprob": -0.5, "bytes": None, "top_logprobs": top}]}
        answer = {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                  "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                               "message": {"role": "assistant", "content": "2. Dates in text\nand more"}}],
                  "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = HTTPServer(("127.0.0.1", 0), _Completions)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_an_openai_compatible_endpoint_writes_and_judges(server):
    _Completions.seen.clear()
    lm = EndpointLanguageModel(server, "served-model")
    assert lm.write(_ask("explain"), max_tokens=20) == "Dates in text"
    p = lm.yes_probability([_ask("judge")])[0]
    assert p == pytest.approx(1 / (1 + 2.718281828 ** -1.0), rel=1e-6)  # e^-0.5 / (e^-0.5 + e^-1.5)
    asked = _Completions.seen[-1]
    assert asked["model"] == "served-model" and asked["max_tokens"] == 1 and asked["top_logprobs"] == 5
    assert asked["messages"] == _ask("judge") and asked["temperature"] == 0


def test_an_unreachable_endpoint_says_what_to_check():
    lm = EndpointLanguageModel("http://127.0.0.1:9/v1", "m", timeout=2.0)
    with pytest.raises(ExplainerError, match="check that the server runs"):
        lm.write(_ask("x"), max_tokens=2)
