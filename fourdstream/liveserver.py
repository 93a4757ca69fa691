"""The live page: rank 0 serves the session and the current scan's images over HTTP.

One page (``/``) that works offline (no scripts from anywhere else), refreshed about
once a second from ``/state.json``, with the images as PNG (``/image/NAME.png``:
``bf``, ``adf``, ``com``, ``counts``, ``pattern``, ``sector_mask``). The server is
tornado (Jupyter's and Bokeh's server: small, well kept, runs in a thread of rank 0,
no extra process); images are encoded with Pillow. Bound to 127.0.0.1 unless told
otherwise: reach it through an SSH tunnel from a compute node.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import threading

import numpy as np

from .live import LiveState

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>fourdstream live</title>
<style>
body { font-family: sans-serif; margin: 1em; background: #fafafa; }
.images { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figcaption { font-size: 90%; text-align: center; }
img { width: 256px; height: 256px; image-rendering: pixelated; background: #000; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; border-bottom: 1px solid #ddd; }
</style></head>
<body>
<h2>fourdstream: live session</h2>
<p id="scan">waiting for a scan...</p>
<p>frames counted per rank: <span id="ranks">-</span>; frames/s per rank: <span id="rate">-</span></p>
<div class="images">
<figure><img id="bf"><figcaption>virtual BF</figcaption></figure>
<figure><img id="adf"><figcaption>virtual ADF</figcaption></figure>
<figure><img id="com"><figcaption>|centre of mass|</figcaption></figure>
<figure><img id="pattern"><figcaption>summed pattern (log)</figcaption></figure>
<figure><img id="sector_mask"><figcaption>loss map (bright: whole)</figcaption></figure>
</div>
<h3>scans written</h3>
<table id="written"><tr><th>scan</th><th>frames</th><th>complete</th><th>incomplete</th>
<th>missing</th><th>losses</th><th>last frame &rarr; file closed (s)</th><th>thresholds</th>
<th>file</th></tr></table>
<script>
let shown = -1, last = null;
async function refresh() {
  try {
    const r = await fetch("/state.json", {cache: "no-store"});
    const s = await r.json();
    const sc = s.scan;
    if (sc.scan !== undefined) {
      document.getElementById("scan").textContent =
        `scan ${sc.scan} (${sc.width}x${sc.height}): ${sc.frames} of ${sc.expected} frames counted` +
        (sc.closed ? " (closed)" : "");
      document.getElementById("ranks").textContent = sc.counted_per_rank.join(", ");
      if (last && last.scan === sc.scan && sc.time > last.time && !sc.closed) {
        document.getElementById("rate").textContent = sc.counted_per_rank.map(
          (n, r) => Math.round((n - (last.counted_per_rank[r] || 0)) / (sc.time - last.time))).join(", ");
      }
      last = sc;
    }
    if (s.version !== shown) {
      shown = s.version;
      for (const name of ["bf", "adf", "com", "pattern", "sector_mask"]) {
        document.getElementById(name).src = `/image/${name}.png?v=${s.version}`;
      }
      const t = document.getElementById("written");
      while (t.rows.length > 1) t.deleteRow(1);
      for (const w of s.session.scans_written) {
        const row = t.insertRow();
        const losses = Object.entries(w.losses || {}).map(([k, v]) => `${k} ${v}`).join(", ");
        for (const v of [w.scan, w.frames, w.complete, w.incomplete, w.missing, losses || "none",
                         w.latency !== undefined ? w.latency.toFixed(2) : w.failed,
                         w.thresholds ? w.thresholds.map(x => x.toFixed(1)).join(" / ") : "",
                         w.path || ""]) {
          row.insertCell().textContent = v === undefined ? "" : v;
        }
      }
    }
  } catch (e) { document.getElementById("scan").textContent = "no connection to the receiver"; }
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""


def png(image: np.ndarray, log: bool = False, low: float | None = None, high: float | None = None) -> bytes:
    """An image scaled to 0-255 grey levels (1st-99th percentile, or ``low``-``high``) as PNG."""
    from PIL import Image

    data = np.log1p(np.asarray(image, np.float64)) if log else np.asarray(image, np.float64)
    lo = np.percentile(data, 1) if low is None else low
    hi = np.percentile(data, 99) if high is None else high
    scaled = np.clip((data - lo) / max(hi - lo, 1e-12), 0, 1) * 255
    out = io.BytesIO()
    Image.fromarray(scaled.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def image_png(images: dict, name: str) -> bytes | None:
    if not images:
        return None
    if name == "com":
        return png(np.hypot(images["com_x"], images["com_y"]))
    if name == "pattern":
        return png(images["pattern"], log=True, low=0.0)
    if name == "sector_mask":
        return png(images["sector_mask"], low=0, high=15)
    return png(images[name]) if name in images else None


def require() -> None:
    """Raise a RuntimeError that says what to install unless the live view's packages
    (tornado, pillow: the ``live`` extra) are installed."""
    missing = [name for name, module in (("tornado", "tornado"), ("pillow", "PIL"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise RuntimeError(f"the live view (--live) needs {' and '.join(missing)}: "
                           "pip install 'fourdstream[live]'")


def start(state: LiveState, host: str = "127.0.0.1", port: int = 0) -> tuple[str, callable]:
    """Serve ``state`` at ``http://host:port/`` from a thread; ``(url, stop)``."""
    require()
    import tornado.httpserver
    import tornado.netutil
    import tornado.web

    class Page(tornado.web.RequestHandler):
        def get(self):
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.write(PAGE)

    class State(tornado.web.RequestHandler):
        def get(self):
            version, view, _ = state.view()
            self.set_header("Content-Type", "application/json")
            self.set_header("Cache-Control", "no-store")
            self.write(json.dumps(dict(view, version=version), default=float))

    class Picture(tornado.web.RequestHandler):
        def get(self, name):
            _, _, images = state.view()
            data = image_png(images, name)
            if data is None:
                raise tornado.web.HTTPError(404)
            self.set_header("Content-Type", "image/png")
            self.write(data)

    sockets = tornado.netutil.bind_sockets(port, host)
    bound = sockets[0].getsockname()[1]
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run():
        asyncio.set_event_loop(loop)
        server = tornado.httpserver.HTTPServer(tornado.web.Application(
            [(r"/", Page), (r"/state.json", State), (r"/image/(\w+)\.png", Picture)]))
        server.add_sockets(sockets)
        loop.call_soon(ready.set)
        loop.run_forever()
        server.stop()

    thread = threading.Thread(target=run, name="fourdstream-live", daemon=True)
    thread.start()
    ready.wait(10)

    def stop():
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)

    return f"http://{host}:{bound}/", stop


def parse_address(spec: str) -> tuple[str, int]:
    """``[HOST:]PORT`` -> (host, port); host 127.0.0.1 unless given."""
    host, _, port = spec.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise ValueError(f"--live takes [HOST:]PORT, got {spec!r}") from None
