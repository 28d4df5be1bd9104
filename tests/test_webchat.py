"""The web chat page in a real headless browser (Debian's chromium driven by selenium).

The page is typed into like a user would; its streamed reply must equal what the API answers
for the same conversation, and a second turn must carry the first one along.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.request
from pathlib import Path

import pytest
import torch

from scratchllm import GPTModel, ModelConfig
from scratchllm.checkpoint import load_checkpoint, save_checkpoint
from scratchllm.inference.engine import Engine
from scratchllm.serve.app import ServerThread

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MODEL = "webchat-test"


def _browser_missing() -> str | None:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        return (
            "chromium/chromium-driver are not installed and could not be installed "
            "(make test installs them with apt-get when run as root with apt available)"
        )
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="scratchllm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory, gpt2_tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=50257, context_length=256, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0
    )
    path = tmp_path_factory.mktemp("webchat") / "ckpt"
    save_checkpoint(path, GPTModel(config), gpt2_tokenizer)
    ckpt = load_checkpoint(path)
    with ServerThread(Engine(ckpt.model, ckpt.tokenizer), model_name=MODEL) as srv:
        yield srv


def api_reply(server, messages: list[dict[str, str]], max_tokens: int) -> str:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    request = urllib.request.Request(
        server.url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]


def test_page_streams_a_reply_and_keeps_the_conversation(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: MODEL in d.find_element(By.ID, "model").text)
    for field, value in (("temperature", "0"), ("max_tokens", "12")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)

    def ask(text: str, turn: int) -> str:
        browser.find_element(By.ID, "input").send_keys(text)
        browser.find_element(By.ID, "send").click()
        wait.until(
            lambda d: (
                len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']")) == turn
            )
        )
        bubbles = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        return browser.execute_script("return arguments[0].textContent;", bubbles[-1])

    first = ask("Hello, who are you?", 1)
    expected = api_reply(server, [{"role": "user", "content": "Hello, who are you?"}], 12)
    assert first == expected and first
    second = ask("Tell me more.", 2)
    history = [
        {"role": "user", "content": "Hello, who are you?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Tell me more."},
    ]
    assert second == api_reply(server, history, 12)
    users = browser.find_elements(By.CSS_SELECTOR, ".msg.user")
    assert [u.text for u in users] == ["Hello, who are you?", "Tell me more."]
    browser.find_element(By.ID, "reset").click()
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".msg"))
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg")  # the conversation was cleared
    third = ask("Tell me more.", 1)
    assert third == api_reply(server, [{"role": "user", "content": "Tell me more."}], 12)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, gpt2_tokenizer):
    """A model with a 128-token context: the page's default budget of 128 cannot fit."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=50257, context_length=128, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0
    )
    path = tmp_path_factory.mktemp("webchat-small") / "ckpt"
    save_checkpoint(path, GPTModel(config), gpt2_tokenizer)
    ckpt = load_checkpoint(path)
    with ServerThread(Engine(ckpt.model, ckpt.tokenizer), model_name=MODEL) as srv:
        yield srv


def test_page_defaults_fit_a_small_context_and_old_turns_are_dropped(
    browser, small_server, one_thread
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(small_server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "context 128" in d.find_element(By.ID, "model").text)
    box = browser.find_element(By.ID, "max_tokens")
    assert box.get_attribute("value") == "32"  # a quarter of the context, not the 128 default
    assert box.get_attribute("max") == "127"
    statuses = []
    # Messages of ~20 tokens with 32-token replies: by the second turn the conversation no
    # longer fits in 128 tokens with room for a reply, so the oldest turns must go.
    for turn in range(1, 4):
        text = f"Message {turn}: tell me a long story about the sea, the ships and the sailors."
        browser.find_element(By.ID, "input").send_keys(text)
        browser.find_element(By.ID, "send").click()
        wait.until(
            lambda d, turn=turn: (
                len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']")) == turn
                or d.find_elements(By.CSS_SELECTOR, ".msg.error")
            )
        )
        errors = browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert not errors, errors[0].text
        bubbles = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        assert browser.execute_script("return arguments[0].textContent;", bubbles[-1])
        statuses.append(browser.find_element(By.ID, "status").text)
    assert any("dropped to fit the context" in s for s in statuses[1:]), statuses
    # The page keeps what the server saw: the last turns, never more than the context allows.
    kept = browser.execute_script("return Array.isArray(history) ? history.length : -1;")
    assert kept in (2, 4)  # the last turn, and the one before it when it fits
