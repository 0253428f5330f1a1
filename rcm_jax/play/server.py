"""The browser world model: a local web server that streams the action-conditioned camera-pan model.

  python -m rcm_jax.main play --config=configs/toy/causal.py:world=camera_pan --checkpoint=runs/x/sf_dmd

Owns: the frame sources (`GroundTruthBackend`: the world's exact renderer; `ModelBackend`: a causal student
through `rollout.stream`, one chunk at a time with the actions pressed so far), the producer thread that
turns chunks into events (`PlaySession`), the HTTP handler (stdlib `ThreadingHTTPServer`: `/` the page,
`/events` Server-Sent Events, `/action` key presses, `/state` JSON) and `main` (the `play` command).

Actions: every key press the page sends (arrows: up/down/left/right, space: stay) is queued; each generated
frame takes the next queued action, or "stay" when the queue is empty, so the world keeps streaming while no
key is pressed. Frame 0 of an episode is the start crop (its action is ignored, as in the world). Each event
carries the chunk's frames (PNG, base64), the actions each frame used and the chunk's generation latency.
Generation starts when the first page connects. An episode ends after play.max_frames frames (the plan's RoPE
positions) and a new one starts from the same view. play.local_blocks / play.sink_blocks (if local_blocks > 0)
replace causal.local_blocks / sink_blocks: a rolling window keeps the cache bounded and the steady-state chunk
compiled once; without one every chunk has a new cache geometry (a compile per chunk).
"""
from __future__ import annotations

import base64
import collections
import errno
import http.server
import io
import json
import os
import threading
import time

import numpy as np

from rcm_jax.data import worlds as worlds_lib
from rcm_jax.errors import UserError

STATIC = os.path.join(os.path.dirname(__file__), "static")
KEY_ACTIONS = {"up": 1, "down": 2, "left": 3, "right": 4, "stay": 0}


class PlayError(UserError):
  pass


def start_origin(world, image_index: int) -> np.ndarray:
  """The centre of the photo: int32 [2] (row, col) top-left of the window, on the world's step grid."""
  hi = np.asarray(world.origin_bounds(image_index))
  return (hi // 2 // world.config.step * world.config.step).astype(np.int32)


# ----------------------------------------------------------------------------- frame sources
class GroundTruthBackend:
  """The world's exact pan (`CameraPan.pan_origins` / `crop`) served chunk by chunk: proves keys -> actions ->
  frames -> page without a trained model."""
  name = "ground truth"

  def __init__(self, world, image_index: int = 0, chunk_frames: int = 1, max_frames: int = 512):
    self.world, self.image_index, self.chunk_frames, self.max_frames = world, image_index, chunk_frames, max_frames
    self.start = start_origin(world, image_index)

  def chunks(self, take_actions):
    """Yields (f0, frames [n, H, W, C] in [-1, 1], actions [n], seconds) forever."""
    while True:
      origin, f0 = self.start, 0
      while f0 < self.max_frames:
        n = min(self.chunk_frames, self.max_frames - f0)
        t = time.perf_counter()
        acts = take_actions(f0, n)
        # one step of the world's rule per frame: origins of [previous frame, this chunk's frames]
        origins = self.world.pan_origins(self.image_index, origin, np.concatenate([[0], acts]))[1:]
        if f0 == 0:
          origins[0] = origin
        frames = self.world.crop(self.image_index, origins)
        origin = origins[-1]
        yield f0, frames, acts, time.perf_counter() - t
        f0 += n


class ModelBackend:
  """A causal student streamed by `rollout.stream`: noise and conditions per chunk, the actions taken from
  the key queue when the chunk starts. Conditioned on the start crop (y on frame 0), like the world's data."""
  name = "model"

  def __init__(self, config, world, model, params, *, image_index: int = 0, seed: int = 0):
    from rcm_jax.play import stream_job
    if model.config.num_actions <= 0:
      raise PlayError("play needs an action-conditioned model (num_actions > 0): train it on the camera-pan world "
                      "(config argument world=camera_pan).")
    self.world, self.model, self.params, self.image_index, self.seed = world, model, params, image_index, seed
    self.settings = stream_job.stream_settings(config)
    play = config.play
    window = ({"local_blocks": int(play.local_blocks), "sink_blocks": int(play.get("sink_blocks", 0))}
              if int(play.get("local_blocks", 0)) else None)   # a bounded cache: one compile for the steady state
    self.plan, self.schedules = stream_job.make_stream_plan(config, int(play.max_frames), key="play.max_frames",
                                                           round_down=True, window=window)
    self.start = start_origin(world, image_index)
    self.first = world.crop(image_index, self.start[None])[0]           # [H, W, C]
    self.chunk_frames = max(f1 - f0 for f0, f1 in self.plan.blocks)
    self.seen_actions = []                                              # what reached the conditioning

  def _y(self, f0: int, n: int) -> np.ndarray:
    h, w, c = self.first.shape
    y = np.zeros((1, n, h, w, c + 1), np.float32)
    if f0 == 0:
      y[0, 0, ..., :c], y[0, 0, ..., c] = self.first, 1.0
    return y

  def chunks(self, take_actions):
    import jax
    import jax.numpy as jnp
    from rcm_jax.inference import rollout
    h, w, c = self.first.shape
    episode = 0
    while True:
      key = jax.random.fold_in(jax.random.key(self.seed), episode)
      taken = {}

      def cond(i, f0, f1):
        taken[i] = take_actions(f0, f1 - f0)
        self.seen_actions.append((episode, f0, taken[i].tolist()))
        return {"actions": jnp.asarray(taken[i][None], jnp.int32), "y": jnp.asarray(self._y(f0, f1 - f0))}

      noise = lambda i, f0, f1: jax.random.normal(jax.random.fold_in(key, 2 * i), (1, f1 - f0, h, w, c))
      for ch in rollout.stream(self.model, self.params, noise, cond, plan=self.plan, schedules=self.schedules,
                               rng=jax.random.fold_in(key, 1), actions_key="the page's actions", **self.settings):
        yield ch.f0, np.asarray(ch.video[0]), taken[ch.index], ch.seconds
      episode += 1


def replay(backend: ModelBackend, actions: np.ndarray, episode: int = 0) -> np.ndarray:
  """The frames [T, H, W, C] the model backend generates for these per-frame actions (offline, same noise)."""
  queue = list(np.asarray(actions, np.int32))
  take = lambda f0, n: np.asarray([queue[f0 + k] if f0 + k < len(queue) else 0 for k in range(n)], np.int32)
  out = []
  for f0, frames, _, _ in backend.chunks(take):
    out.append(frames)
    if f0 + len(frames) >= len(queue):
      break
  return np.concatenate(out)[:len(queue)]


# ----------------------------------------------------------------------------- session
def encode_png(frame: np.ndarray) -> str:
  from PIL import Image
  from rcm_jax.training.writer import to_uint8
  buf = io.BytesIO()
  Image.fromarray(to_uint8(frame)).save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode("ascii")


class PlaySession:
  """Runs a backend in a producer thread, paced to `fps`; keeps the last events for the SSE clients."""

  def __init__(self, backend, *, fps: float = 8.0, max_queue: int = 16, keep: int = 256):
    self.backend, self.fps = backend, fps
    self.queue = collections.deque(maxlen=max_queue)
    self.events, self.keep, self.seq = [], keep, 0
    self.cond = threading.Condition()
    self.stop = threading.Event()
    self.started = threading.Event()       # the first page connected: generation starts from frame 0
    self.error = None
    self.thread = threading.Thread(target=self._run, name="rcm-play-producer", daemon=True)

  def press(self, action: int) -> None:
    with self.cond:
      self.queue.append(int(action))

  def _take(self, f0: int, n: int) -> np.ndarray:
    with self.cond:
      acts = [self.queue.popleft() if self.queue else 0 for _ in range(n)]
    if f0 == 0:          # frame 0 is the start view: its action is ignored, keep the key for frame 1
      if acts[0]:
        with self.cond:
          self.queue.appendleft(acts[0])
      acts[0] = 0
    return np.asarray(acts, np.int32)

  def _run(self):
    while not self.started.wait(0.2):
      if self.stop.is_set():
        return
    next_time = time.perf_counter()
    try:
      for f0, frames, acts, seconds in self.backend.chunks(self._take):
        if self.stop.is_set():
          return
        event = {"seq": self.seq, "frame": int(f0), "actions": [int(a) for a in acts],
                 "latency_ms": 1000.0 * seconds, "frames": [encode_png(f) for f in frames],
                 "backend": self.backend.name}
        with self.cond:
          self.events.append(event)
          self.events = self.events[-self.keep:]
          self.seq += 1
          self.cond.notify_all()
        next_time = max(next_time + len(frames) / self.fps, time.perf_counter())
        self.stop.wait(max(0.0, next_time - time.perf_counter()))
    except Exception as e:   # shown on the page and in /state; the server keeps answering
      self.error = f"{type(e).__name__}: {e}"
      with self.cond:
        self.cond.notify_all()

  def events_after(self, seq: int, timeout: float = 1.0) -> list:
    with self.cond:
      if not self.events or self.events[-1]["seq"] < seq:
        self.cond.wait(timeout)
      return [e for e in self.events if e["seq"] >= seq]


class _Handler(http.server.BaseHTTPRequestHandler):
  session: PlaySession = None
  protocol_version = "HTTP/1.1"

  def log_message(self, fmt, *args):   # quiet
    pass

  def _send(self, code: int, body: bytes, ctype: str):
    self.send_response(code)
    self.send_header("Content-Type", ctype)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    self.end_headers()
    self.wfile.write(body)

  def do_GET(self):
    if self.path in ("/", "/index.html"):
      with open(os.path.join(STATIC, "index.html"), "rb") as f:
        return self._send(200, f.read(), "text/html; charset=utf-8")
    if self.path == "/state":
      s = self.session
      body = {"seq": s.seq, "queued": list(s.queue), "error": s.error, "backend": s.backend.name,
              "actions": worlds_lib.ACTION_NAMES}
      return self._send(200, json.dumps(body).encode(), "application/json")
    if self.path.startswith("/events"):
      return self._events()
    return self._send(404, b"not found", "text/plain")

  def _events(self):
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-store")
    self.send_header("Connection", "close")
    self.end_headers()
    self.session.started.set()
    seq = self.session.events[0]["seq"] if self.session.events else 0
    try:
      while not self.session.stop.is_set():
        for e in self.session.events_after(seq):
          self.wfile.write(b"data: " + json.dumps(e).encode() + b"\n\n")
          seq = e["seq"] + 1
        if self.session.error:
          self.wfile.write(b"event: failure\ndata: " + json.dumps(self.session.error).encode() + b"\n\n")
          return
        self.wfile.write(b": keep-alive\n\n")
        self.wfile.flush()
    except (BrokenPipeError, ConnectionResetError):
      return

  def do_POST(self):
    if self.path != "/action":
      return self._send(404, b"not found", "text/plain")
    try:
      body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
      action = KEY_ACTIONS[body["action"]]
    except (ValueError, KeyError, TypeError):
      return self._send(400, b"want {\"action\": \"up|down|left|right|stay\"}", "text/plain")
    self.session.press(action)
    return self._send(200, b"{}", "application/json")


def bind(host: str, port: int) -> http.server.ThreadingHTTPServer:
  """The server socket; a port in use is one clear PlayError."""
  try:
    server = http.server.ThreadingHTTPServer((host, port), _Handler)
  except OSError as e:
    if e.errno in (errno.EADDRINUSE, errno.EACCES):
      raise PlayError(f"cannot listen on {host}:{port} ({os.strerror(e.errno)}); pick a free one with "
                      "--port=PORT.") from None
    raise PlayError(f"cannot listen on {host}:{port}: {e}; check --host and --port.") from None
  server.daemon_threads = True
  return server


def serve(server: http.server.ThreadingHTTPServer, session: PlaySession) -> threading.Thread:
  """Start the producer and the HTTP loop in background threads; returns the HTTP thread."""
  server.RequestHandlerClass = type("Handler", (_Handler,), {"session": session})
  session.thread.start()
  thread = threading.Thread(target=server.serve_forever, name="rcm-play-http", daemon=True)
  thread.start()
  return thread


def shutdown(server, session) -> None:
  session.stop.set()
  with session.cond:
    session.cond.notify_all()
  server.shutdown()
  server.server_close()


def main(config, *, checkpoint: str, host: str = "127.0.0.1", port: int = 8000) -> None:
  """The `play` command: check the checkpoint, bind the port, load the model, serve until Ctrl-C."""
  from rcm_jax.play import stream_job
  if not os.path.isdir(checkpoint):
    raise PlayError(f"--checkpoint={checkpoint} is not a directory; give a causal stage's directory.")
  stream_job.check_causal_checkpoint(checkpoint, "--checkpoint")
  if config.world != "camera_pan":
    raise PlayError(f"play needs the action-conditioned camera-pan model, but the config's world is "
                    f"{config.world!r}; use --config=configs/toy/causal.py:world=camera_pan (or sf_dmd.py).")
  server = bind(host, port)
  try:
    world, model, params = stream_job.load_causal(config, checkpoint, "--checkpoint")
    backend = ModelBackend(config, world, model, params, image_index=int(config.play.get("image_index", 0)),
                           seed=int(config.seed))
    session = PlaySession(backend, fps=float(config.play.get("fps", 8.0)))
    serve(server, session)
    print(f"rcm_jax play: http://{host}:{port}/  ({backend.chunk_frames} frame(s) a chunk, "
          f"{config.sample.steps} step(s); arrows move, space stays; Ctrl-C stops)", flush=True)
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
