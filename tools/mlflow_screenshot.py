"""Screenshot of an MLflow experiment's runs table with one parent run expanded (headless Chromium
driven over the DevTools protocol), for docs/img/mlflow_pipeline_runs.png.

    mlflow ui --backend-store-uri sqlite:///$PWD/runs/synthetic/mlflow.db --port 5055 &
    python tools/mlflow_screenshot.py http://127.0.0.1:5055 1 docs/img/mlflow_pipeline_runs.png

Needs `chromium` on PATH and `pip install websocket-client` (not a dependency of lfb_ray).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.request

EXPAND = ('(() => { const b = document.querySelector("button[data-component-id*=runnamecellrenderer]");'
          ' if (b) b.click(); document.querySelectorAll("button").forEach(x => {'
          ' if (/close/i.test(x.getAttribute("aria-label") || "")) x.click(); }); return !!b; })()')


def main(argv: list[str]) -> int:
    import websocket

    url, experiment, out = argv
    chrome = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               "--window-size=1700,760", "--remote-debugging-port=9333", "about:blank"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                tabs = json.load(urllib.request.urlopen("http://127.0.0.1:9333/json"))
                break
            except OSError:
                time.sleep(0.3)
        else:
            raise SystemExit("chromium's DevTools endpoint did not come up")
        ws = websocket.create_connection(next(t for t in tabs if t["type"] == "page")["webSocketDebuggerUrl"],
                                         suppress_origin=True)
        seq = 0

        def call(method: str, **params) -> dict:
            nonlocal seq
            seq += 1
            ws.send(json.dumps({"id": seq, "method": method, "params": params}))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("id") == seq:
                    return msg

        call("Page.enable")
        call("Page.navigate", url=f"{url}/#/experiments/{experiment}/runs")
        time.sleep(12)  # the React app loads and queries the runs
        if not call("Runtime.evaluate", expression=EXPAND, returnByValue=True)["result"]["result"].get("value"):
            print("warning: no parent run to expand", file=sys.stderr)
        time.sleep(5)
        png = call("Page.captureScreenshot", format="png")["result"]["data"]
        with open(out, "wb") as f:
            f.write(base64.b64decode(png))
        print(f"wrote {out}")
        return 0
    finally:
        chrome.terminate()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
