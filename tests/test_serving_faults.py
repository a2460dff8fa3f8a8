"""A real `mlflow models serve` under bad requests and load: clear 4xx answers, then still correct.

Issue 7. One server serves a saved loraflow model for the whole module. Every bad request (wrong
column, numbers as prompts, an empty batch, an absurd `max_new_tokens`, malformed JSON, a 30 MB
body) must get a 4xx with a message, and the server must answer a good request correctly right
after. Then 200 requests from 8 concurrent clients must all get exactly the in-process pyfunc
answer, while the server's memory stays flat. No timings are asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import BIN, env_with_venv, free_port, stop, wait_for_http

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`"),
]

PARAMS = {"max_new_tokens": 4}
PROMPTS = [f"Question {i}: what is {word}?\nAnswer:" for i, word in enumerate(
    ["LoRA", "a cow", "the sky", "rank", "MLflow", "a model", "dropout", "a token", "Paris", "zero"])]
GOOD = {"inputs": ["Hello"], "params": PARAMS}


def post(url: str, body: bytes | dict, content_type: str = "application/json", timeout: float = 120) -> tuple[int, dict | str]:
    status, raw = post_raw(url, body, content_type, timeout)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def post_raw(url: str, body: bytes | dict, content_type: str = "application/json", timeout: float = 300) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def texts(body: dict) -> list[str]:
    return [row["text"] for row in body["predictions"]]


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_path) -> Path:
    from model_helpers import make_peft_model

    from loraflow import flavor
    from loraflow.flavor.bases import load_base_model, load_tokenizer

    path = tmp_path_factory.mktemp("serving-faults") / "model"
    base = load_base_model(tiny_path).eval()
    flavor.save_model(make_peft_model(base), path, load_tokenizer(tiny_path), base_model="builtin:tiny", batch_size=4)
    return path


@pytest.fixture(scope="module")
def expected(model_dir) -> dict[str, str]:
    """What in-process pyfunc answers for each prompt sent alone (the server's request shape)."""
    import mlflow

    model = mlflow.pyfunc.load_model(str(model_dir), model_config={"device": "cpu"})
    return {p: model.predict([p], params=PARAMS)["text"][0] for p in [*PROMPTS, "Hello"]}


@pytest.fixture(scope="module")
def server(model_dir):
    if not sys.platform.startswith("linux"):
        pytest.skip("memory is read from /proc")
    port = free_port()
    log = open(model_dir.parent / "serve.log", "wb")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", str(model_dir), "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=env_with_venv(CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false"),  # CPU, as `expected`
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/ping", proc, timeout=180)
        yield url, proc, model_dir.parent / "serve.log"
    finally:
        stop(proc)
        log.close()


def assert_still_answers(url: str, expected: dict[str, str]) -> None:
    status, body = post(url, GOOD)
    assert status == 200 and texts(body) == [expected["Hello"]], body


BAD_REQUESTS = {
    "wrong column": ({"dataframe_records": [{"question": "hi"}], "params": PARAMS}, "prompt"),
    "numbers as prompts (records)": ({"dataframe_records": [{"prompt": 1}, {"prompt": 2.5}]}, ""),
    "numbers as prompts (split)": ({"dataframe_split": {"columns": ["prompt"], "data": [[1], [2]]}}, ""),
    "a list as a prompt": ({"dataframe_records": [{"prompt": ["a", ["b"]]}]}, "one prompt per row"),
    "two prompts in a row (records)": ({"dataframe_records": [{"prompt": ["a", "b"]}], "params": PARAMS},
                                       "rows [0] hold a list of prompts"),
    "two prompts in a row (inputs)": ({"inputs": [["hi", "yo"]], "params": PARAMS}, "send one prompt per row"),
    "an unknown key beside prompt": ({"prompt": "hi", "max_tokens": 4, "bogus": 1}, "unknown request keys ['bogus']"),
    "OpenAI's n beside prompt": ({"prompt": "hi", "max_tokens": 4, "n": 2}, "unsupported OpenAI parameters ['n']"),
    "OpenAI's stream in params": ({"inputs": ["hi"], "params": {**PARAMS, "stream": True}},
                                  "unsupported OpenAI parameters ['stream']"),
    "a null prompt": ({"dataframe_records": [{"prompt": None}]}, ""),
    "an empty batch": ({"inputs": [], "params": PARAMS}, ""),
    "empty records": ({"dataframe_records": []}, ""),
    "absurd max_new_tokens": ({"inputs": ["hi"], "params": {"max_new_tokens": 10**9}}, "max_new_tokens"),
    "max_new_tokens beyond int64": ({"inputs": ["hi"], "params": {"max_new_tokens": 10**30}}, "max_new_tokens"),
    "negative max_new_tokens": ({"inputs": ["hi"], "params": {"max_new_tokens": -1}}, "max_new_tokens"),
    "a string for max_new_tokens": ({"inputs": ["hi"], "params": {"max_new_tokens": "many"}}, "max_new_tokens"),
    "no data key": ({"prompts": ["hi"]}, ""),
    "malformed JSON": (b'{"inputs": ["hi"', ""),
    "JSON that is not an object": (b'"hi"', ""),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_a_4xx_with_a_message_and_the_server_survives(case, server, expected):
    url, proc, _ = server
    payload, words = BAD_REQUESTS[case]
    status, body = post(url, payload)
    assert 400 <= status < 500, (case, status, body)
    message = body.get("message", "") if isinstance(body, dict) else body
    assert message.strip() and words in message, (case, body)
    assert proc.poll() is None
    assert_still_answers(url, expected)


def test_what_mlflow_accepts_before_the_model_sees_it(server, expected):
    """Requests MLflow's scoring server changes before `predict`: pinned so a change is noticed.

    - The model has no input schema, so `inputs` arrives as sent: JSON numbers are refused, not
      turned into the strings "1", "2.5".
    - params missing from the params schema are dropped by MLflow with a warning in the server log
      naming them, so a typo gets the default instead of our did-you-mean (which in-process pyfunc
      gives); `max_tokens`, OpenAI's name for max_new_tokens, is in the schema and honoured.
    - "" is a valid prompt for a tokenizer that adds BOS: generation starts from BOS alone.
    """
    url, _, log = server
    status, body = post(url, {"inputs": [1, 2.5], "params": PARAMS})
    assert status == 400 and "every `prompt` must be a string" in body["message"], body
    status, body = post(url, {"inputs": ["Hello"], "params": {**PARAMS, "max_new_tokenz": 50}})
    assert status == 200 and texts(body) == [expected["Hello"]]
    assert "Unrecognized params ['max_new_tokenz'] are ignored" in log.read_text(errors="replace")
    # OpenAI's `max_tokens` is in the params schema now (read as max_new_tokens), so it is honoured
    status, body = post(url, {"inputs": ["Hello"], "params": {**PARAMS, "max_tokens": 50}})
    assert status == 200 and texts(body)[0].startswith(expected["Hello"])
    assert len(texts(body)[0]) > len(expected["Hello"]) or texts(body) == [expected["Hello"]]
    status, body = post(url, {"inputs": [""], "params": PARAMS})
    assert status == 200 and len(texts(body)) == 1


def test_openais_completions_body_with_a_list_prompt_gets_one_choice_per_prompt(server, expected):
    url, _, _ = server
    status, body = post(url, {"prompt": PROMPTS[:3], "max_tokens": PARAMS["max_new_tokens"]})
    assert status == 200 and body["object"] == "text_completion", body
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(i, expected[p]) for i, p in enumerate(PROMPTS[:3])]
    assert body["usage"]["completion_tokens"] <= 3 * PARAMS["max_new_tokens"]


TWO_MB = "word " * 400_000
BIG_ERRORS = {
    "a 2 MB prompt (over max_request_chars)": ({"prompt": TWO_MB, "max_tokens": 4}, "max_request_chars"),
    "a 0.9 MB prompt too long for the context": ({"inputs": ["word " * 180_000], "params": PARAMS},
                                                 "exceeds the model's context"),
    "a 2 MB prompt with a wrong-typed param": ({"inputs": [TWO_MB], "params": {"max_new_tokens": "many"}},
                                               "max_new_tokens"),
    "a 2 MB prompt in a list": ({"inputs": [[TWO_MB, "b"]], "params": PARAMS}, "one prompt per row"),
    "a malformed 2 MB body": (b'{"inputs": ["' + TWO_MB.encode(), "valid JSON"),
}


@pytest.mark.parametrize("case", list(BIG_ERRORS))
def test_an_error_about_a_huge_request_has_a_small_body_naming_the_reason(case, server):
    url, _, _ = server
    payload, words = BIG_ERRORS[case]
    status, raw = post_raw(url, payload)
    assert 400 <= status < 500, (case, status, raw[:300])
    assert len(raw) <= 4096, (case, len(raw))  # MLflow's server quotes the whole request in its errors
    message = json.loads(raw)["message"]
    assert words in message and "characters left out" in message, (case, message)
    print(f"{case}: {len(raw)} bytes")  # -s shows it


def test_an_oversized_body_is_refused_and_the_server_survives(server, expected):
    # MLflow's scoring server (FastAPI on uvicorn) reads any body size; the model refuses requests
    # over model_config `max_request_prompts` / `max_request_chars` with a 400 before tokenizing.
    url, proc, _ = server
    many = {"inputs": ["word " * 2000] * 3000, "params": PARAMS}  # 3000 prompts, 30 MB of text
    status, body = post(url, many, timeout=300)
    assert status == 400 and "too large" in body["message"], body
    assert "max_request_prompts" in body["message"] and "max_request_chars" in body["message"]
    one_long = {"inputs": ["word " * 6_000_000], "params": PARAMS}  # a single 30 MB prompt
    status, body = post(url, one_long, timeout=300)
    assert status == 400 and "max_request_chars" in body["message"], body
    assert proc.poll() is None
    assert_still_answers(url, expected)


def test_200_concurrent_requests_are_all_correct_and_memory_stays_flat(server, expected):
    url, proc, _ = server
    requests = [PROMPTS[i % len(PROMPTS)] for i in range(200)]

    def ask(prompt: str) -> tuple[str, int, list[str] | object]:
        status, body = post(url, {"inputs": [prompt], "params": PARAMS})
        return prompt, status, texts(body) if status == 200 else body

    with ThreadPoolExecutor(max_workers=8) as clients:
        first = list(clients.map(ask, requests[:50]))
        rss_after_50 = tree_rss_bytes(proc.pid)
        rest = list(clients.map(ask, requests[50:]))
        rss_after_200 = tree_rss_bytes(proc.pid)

    wrong = [(p, s, got) for p, s, got in first + rest if s != 200 or got != [expected[p]]]
    assert not wrong, f"{len(wrong)} of 200 answers differ from in-process pyfunc, e.g. {wrong[:3]}"
    # After warm-up (allocator pools, lazily imported modules, thread pools) RSS should be flat; a
    # leak of even a few KB per request would show as growth over 150 requests of a tiny model.
    # The margin is generous because glibc does not return freed arenas promptly under threads.
    assert rss_after_200 < max(1.5 * rss_after_50, rss_after_50 + 200 * 2**20), (rss_after_50, rss_after_200)
    assert proc.poll() is None
    print(f"server RSS after 50 requests: {rss_after_50 / 2**20:.0f} MiB; after 200: {rss_after_200 / 2**20:.0f} MiB")  # -s shows it
