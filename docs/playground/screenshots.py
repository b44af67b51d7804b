"""Remake the screenshots of docs/playground.md: the default model served on a thread, the
page driven in Debian's Chromium (run with the project's .venv: `.venv/bin/python
docs/playground/screenshots.py`)."""
from pathlib import Path

from playwright.sync_api import sync_playwright

from llama_ref import load_model
from llama_ref.server.thread import ThreadServer
from llama_ref.tools.assets import default_model

HERE = Path(__file__).parent
SHOTS = {   # file: (form fields, selects, the step to show)
    "raw-top-k-top-p.png": ({"#prompt": "The capital of France is", "#temperature": "0.7", "#top_k": "20",
                             "#top_p": "0.9", "#seed": "1", "#max_tokens": "12"}, {}, 1),
    "chat-min-p-penalty.png": ({"#prompt": "Name three colours.", "#temperature": "1.3", "#min_p": "0.05",
                                "#repetition_penalty": "1.3", "#seed": "3", "#max_tokens": "16"}, {"#mode": "chat"}, 4),
    "side-by-side.png": ({"#prompt": "My favourite food is", "#temperature": "1.6", "#top_p": "0.7", "#seed": "2",
                          "#max_tokens": "12"}, {"#compare_profile": "llama.cpp"}, 0),
}


def main():
    server = ThreadServer(load_model(default_model()), served_model_name="default")
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        for name, (fields, selects, step) in SHOTS.items():
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(server.url + "/playground")
            page.wait_for_function("document.getElementById('model').options.length > 0")
            for selector, value in selects.items():
                page.select_option(selector, value)
            for selector, value in fields.items():
                page.fill(selector, value)
            page.click("#generate")
            page.wait_for_selector("#stepper:not([hidden])", timeout=120_000)
            page.fill("#step", str(step))
            page.screenshot(path=HERE / name, full_page=True)
            print(name, page.inner_text("#summary"))
            page.close()
        browser.close()
    server.stop()


if __name__ == "__main__":
    main()
