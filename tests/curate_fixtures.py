"""Helpers of tests/test_curate.py: a local HTTP server that serves generated images and
imitates OpenAI-compatible ``/v1/chat/completions`` for a template LLM and a captioning VLM.

Everything is deterministic: the final answer to a request depends only on its content.
Misbehaviour (malformed answers, 429/500 once, a slow answer once) is assigned to request
contents in order of first arrival, and a retried request (which carries a reminder) or a
repeated one (after a transport error) gets the clean answer, so an interrupted and resumed
run ends with the same captions as an uninterrupted one.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

BACKGROUND = (20, 20, 20)
PERSON = (240, 255, 0)  # fake backend: confidence 0.94, 17 visible keypoints, head + hips first
SLOW_SECONDS = 2.5  # longer than the clients' timeouts in the tests


@dataclasses.dataclass(frozen=True)
class Blob:
    x: int
    y: int
    w: int
    h: int
    rgb: tuple[int, int, int] = PERSON


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """A generated image: canvas size, blobs and the filter outcome of each blob (None = kept)."""

    size: tuple[int, int]
    blobs: tuple[Blob, ...]
    outcomes: tuple[str | None, ...]


def _good(i: int) -> ImageSpec:
    w, h = 100 + (i % 3) * 4, 250 + (i % 4) * 10
    rgb = (230 + (i % 3) * 8, 255 if i % 2 else 150, 0)  # 17 or 10 visible keypoints (head and hips first)
    return ImageSpec((200, 320), (Blob((200 - w) // 2 + (i % 5) - 2, 20 + i % 7, w, h, rgb),), (None,))


IMAGES: dict[str, ImageSpec] = {f"good{i:02d}": _good(i) for i in range(12)}
IMAGES.update({
    "two_people": ImageSpec((400, 320), (Blob(30, 30, 100, 250), Blob(250, 40, 100, 240, (170, 255, 0))),
                            (None, "low_confidence")),
    "lowconf": ImageSpec((200, 320), (Blob(50, 30, 100, 250, (170, 255, 0)),), ("low_confidence",)),
    "small": ImageSpec((200, 320), (Blob(70, 60, 60, 150),), ("too_small",)),
    "wide": ImageSpec((400, 240), (Blob(100, 40, 200, 150),), ("aspect_ratio",)),
    "thin": ImageSpec((200, 500), (Blob(50, 20, 95, 450),), ("aspect_ratio",)),
    "fewkp": ImageSpec((200, 320), (Blob(50, 30, 100, 250, (240, 90, 0)),), ("few_keypoints",)),
    "nohip": ImageSpec((200, 320), (Blob(50, 30, 100, 250, (240, 150, 64)),), ("no_hip",)),
    "fewhead": ImageSpec((200, 320), (Blob(50, 30, 100, 250, (240, 195, 128)),), ("few_head_keypoints",)),
    "car": ImageSpec((200, 320), (Blob(50, 30, 100, 250, (240, 255, 255)),), ("not_person",)),
    "empty": ImageSpec((200, 320), (), ()),
    # Served with misbehaviour but stored in the end:
    "flaky": ImageSpec((200, 320), (Blob(48, 24, 104, 262),), (None,)),
    "limited": ImageSpec((200, 320), (Blob(52, 28, 96, 258),), (None,)),
    "octet": ImageSpec((200, 320), (Blob(46, 22, 108, 266),), (None,)),
})
#: URL path -> ingest failure reason.
FAILING = {"corrupt": "decode_error", "missing": "http_404", "slow": "timeout", "html": "bad_content_type",
           "fakejpeg": "not_an_image", "huge": "too_large", "gone500": "http_500"}
MAX_BYTES = 200_000
EXPECTED_REJECTIONS = collections.Counter(o for s in IMAGES.values() for o in s.outcomes if o is not None)
EXPECTED_REJECTIONS["no_detection"] = sum(1 for s in IMAGES.values() if not s.blobs)
EXPECTED_CROPS = sum(1 for s in IMAGES.values() for o in s.outcomes if o is None)


def render(spec: ImageSpec) -> bytes:
    img = Image.new("RGB", spec.size, BACKGROUND)
    for b in spec.blobs:
        img.paste(b.rgb, (b.x, b.y, b.x + b.w, b.y + b.h))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- benchmark captions

COLOURS = "red|blue|green|yellow|black|white|gray|grey|brown|pink|purple|orange|navy|beige"
_SUBSTITUTIONS = [
    (re.compile(rf"\b(?:long|short|curly|straight) (?:(?:{COLOURS}) )?hair\b", re.I), "[hairstyle]"),
    (re.compile(rf"\b(?:{COLOURS}) (?:t-shirt|shirt|jacket|coat|sweater|hoodie|blouse)\b", re.I), "[colored top]"),
    (re.compile(rf"\b(?:{COLOURS}) (?:jeans|pants|trousers|skirt|shorts)\b", re.I), "[colored bottom]"),
    (re.compile(rf"\b(?:{COLOURS}) (?:sneakers|shoes|boots|sandals)\b", re.I), "[footwear]"),
    (re.compile(rf"\b(?:(?:{COLOURS}) )?(?:backpack|handbag|shoulder bag)\b", re.I), "[bag]"),
]
_PATTERNS = [
    "A {g} with {hair} wears a {top}, {bottom} and {shoes}.",
    "The {g} has {hair}. {P} is wearing a {top} and {bottom}, with {shoes}.",
    "This {g} is carrying a {bag}. {P} wears a {top} with {bottom}.",
    "A {g} in a {top} and {bottom} walks with a {bag}, wearing {shoes}.",
]
_VALUES = {
    "hair": ["long black hair", "short brown hair", "curly hair", "straight blonde hair"],
    "top": ["red jacket", "white t-shirt", "blue coat", "black sweater", "grey hoodie"],
    "bottom": ["blue jeans", "black trousers", "pink skirt", "grey shorts"],
    "shoes": ["white sneakers", "black boots", "brown shoes"],
    "bag": ["black backpack", "red handbag", "brown shoulder bag"],
}


def benchmark_captions(n: int, offset: int = 0) -> list[str]:
    out = []
    for i in range(offset, offset + n):
        g = "woman" if (i // 4) % 2 else "man"
        values = {k: v[(i * (j + 1)) % len(v)] for j, (k, v) in enumerate(_VALUES.items())}
        out.append(_PATTERNS[i % len(_PATTERNS)].format(g=g, P="She" if g == "woman" else "He", **values))
    return out


#: A colour that the fake LLM does not replace (stop-list rejection) and a one-attribute caption.
LEFTOVER_CAPTION = "A man in a red jacket carries a green umbrella and wears black boots."
ONE_ATTRIBUTE_CAPTION = "A woman in a white coat is walking down the street slowly."


def write_benchmarks(folder) -> dict[str, object]:
    """CUHK-PEDES-, RSTPReid-style JSON files and a text file; return paths and the expected train captions."""
    cuhk_train = benchmark_captions(12)
    cuhk_test = [f"{c} (test split)" for c in benchmark_captions(4, offset=40)]
    cuhk = [{"split": "train", "captions": cuhk_train[i:i + 2], "file_path": f"CUHK01/{i:04d}.png", "id": i + 1,
             "processed_tokens": []} for i in range(0, 12, 2)]
    cuhk += [{"split": "test", "captions": [c], "file_path": f"test/{i}.png", "id": 100 + i, "processed_tokens": []}
             for i, c in enumerate(cuhk_test)]
    rstp_train = benchmark_captions(8, offset=12) + [LEFTOVER_CAPTION, ONE_ATTRIBUTE_CAPTION]
    rstp = [{"id": i, "img_path": f"{i:04d}_c1.jpg", "captions": rstp_train[i:i + 2], "split": "train"}
            for i in range(0, len(rstp_train), 2)]
    rstp.append({"id": 99, "img_path": "x.jpg", "captions": cuhk_test[:2], "split": "val"})
    text = benchmark_captions(8, offset=20)
    paths = {"cuhk": folder / "reid_raw.json", "rstp": folder / "data_captions.json", "txt": folder / "captions.txt"}
    paths["cuhk"].write_text(json.dumps(cuhk))
    paths["rstp"].write_text(json.dumps(rstp))
    paths["txt"].write_text("\n".join(text) + "\n\n")
    return {"paths": paths, "train": cuhk_train + rstp_train + text, "excluded": cuhk_test}


def fake_template(caption: str) -> str:
    for pattern, placeholder in _SUBSTITUTIONS:
        caption = pattern.sub(placeholder, caption)
    return caption


SYNTH_OPENERS = ["This pedestrian", "The person", "Someone", "An adult pedestrian", "The walker"]
SYNTH_INVALID = ["A person in a green [colored top] and [footwear].", "1. Only [hairstyle] visible here today."]


def fake_synthesis(examples: list[str], n: int) -> list[str]:
    out = []
    for j in range(n):
        words = examples[j % len(examples)].split()
        out.append(f"{SYNTH_OPENERS[j % len(SYNTH_OPENERS)]} {' '.join(words[2:])}")
    return out


# --------------------------------------------------------------------------- VLM answers

_FILL_COLOURS = ["red", "blue", "green", "black", "white", "grey", "brown", "dark", "light", "yellow"]


def vlm_fill(template: str, image: bytes, model: str) -> str:
    """The clean caption the fake VLM writes for a template and an image."""
    digest = hashlib.sha1(image + model.encode()).digest()
    count = [0]

    def replace(match: re.Match) -> str:
        name = match.group(1).lower()
        colour = _FILL_COLOURS[digest[count[0] % len(digest)] % len(_FILL_COLOURS)]
        count[0] += 1
        if "top" in name:
            return f"{colour} jacket"
        if "bottom" in name:
            return f"{colour} trousers"
        if "hair" in name:
            return "short dark hair"
        if "foot" in name:
            return f"{colour} shoes"
        if "bag" in name:
            return "backpack"
        return "item"

    return re.sub(r"\[([^\[\]]+)\]", replace, template)


LLM_CYCLE = ["normal", "wrapped", "normal", "empty", "normal", "refusal", "http429", "http500"]
VLM_CYCLE = ["normal", "wrapped", "empty", "refusal", "long_sentences", "long_run_on", "http429", "http500",
             "slow", "normal"]
TRANSIENT = ("http429", "http500", "slow")
REMINDER_MARK = "previous answer was not usable"


class FakeBackend:
    """The deterministic chat and image logic behind the server (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: collections.Counter[str] = collections.Counter()  # per content hash
        self.behaviour: dict[str, str] = {}
        self.served: collections.Counter[str] = collections.Counter()  # behaviour -> times served
        self.order = collections.Counter()  # kind -> distinct contents seen
        self.path_hits: collections.Counter[str] = collections.Counter()
        self.active = 0
        self.max_active = 0
        self.vlm_prompts: list[str] = []

    # ---- chat

    def chat(self, body: dict) -> tuple[int, dict, bytes, float]:
        model = body.get("model", "")
        if model not in ("fake-llm", "fake-vlm-a", "fake-vlm-b", "fake-echo"):
            return _error(404, f"The model `{model}` does not exist.")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages must be a non-empty list")
        user = messages[-1]["content"]
        if model == "fake-echo":
            return self._echo(user)
        if model == "fake-llm":
            text = user if isinstance(user, str) else ""
            kind, cycle = ("synth" if "<examples>" in text else "llm"), LLM_CYCLE
        else:
            parts = {p.get("type"): p for p in user} if isinstance(user, list) else {}
            if "image_url" not in parts or "text" not in parts:
                return _error(400, "expected an image_url part and a text part")
            url = parts["image_url"]["image_url"]["url"]
            if not url.startswith("data:image/jpeg;base64,"):
                return _error(400, "image must be a base64 JPEG data URL")
            image = base64.b64decode(url.split(",", 1)[1])
            try:
                Image.open(io.BytesIO(image)).verify()
            except Exception as e:  # any decoding problem is the client's fault here
                return _error(400, f"undecodable image: {e}")
            text = parts["text"]["text"]
            kind, cycle = "vlm", VLM_CYCLE
        digest = hashlib.sha1(json.dumps([model, messages], sort_keys=True).encode()).hexdigest()
        with self.lock:
            self.requests[digest] += 1
            first = self.requests[digest] == 1
            if digest not in self.behaviour:
                # A request that repeats an earlier one with a reminder is answered normally and takes no
                # place in the cycle: otherwise reminders, whose arrival order depends on the scheduler,
                # could occupy every position of one behaviour and it would never be served.
                if REMINDER_MARK in text and kind != "synth":
                    self.behaviour[digest] = "normal"
                elif kind == "synth":
                    self.behaviour[digest] = "normal" if self.order["synth"] or REMINDER_MARK in text \
                        else "synth_wrapped"
                    self.order[kind] += 1
                else:
                    self.behaviour[digest] = cycle[self.order[kind] % len(cycle)]
                    self.order[kind] += 1
            behaviour = self.behaviour[digest]
            if behaviour in TRANSIENT and not first:
                behaviour = "normal"
            self.served[behaviour] += 1
            if kind == "vlm":
                self.vlm_prompts.append(text)
        if behaviour == "http429":
            return 429, {"Retry-After": "0"}, b'{"error": {"message": "rate limited"}}', 0.0
        if behaviour == "http500":
            return _error(500, "internal error")
        delay = SLOW_SECONDS if behaviour == "slow" else 0.0
        if kind == "llm":
            answer = self._llm_answer(text, behaviour)
        elif kind == "synth":
            answer = self._synth_answer(text, behaviour)
        else:
            answer = self._vlm_answer(text, image, model, behaviour)
        payload = {"id": "cmpl-" + digest[:8], "object": "chat.completion", "model": model,
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": answer}}]}
        return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode(), delay

    def _echo(self, text: str) -> tuple[int, dict, bytes, float]:
        """Per content: 500, then 429, then the echoed text (client retry tests)."""
        with self.lock:
            self.requests["echo:" + text] += 1
            n = self.requests["echo:" + text]
        if n == 1:
            return _error(500, "internal error")
        if n == 2:
            return 429, {"Retry-After": "0"}, b'{"error": {"message": "rate limited"}}', 0.0
        payload = {"choices": [{"index": 0, "message": {"role": "assistant",
                                                         "content": [{"type": "text", "text": f"echo: {text}"}]}}]}
        return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode(), 0.0

    @staticmethod
    def _llm_answer(text: str, behaviour: str) -> str:
        caption = re.search(r"<caption>(.*?)</caption>", text, re.S).group(1)
        template = fake_template(caption)
        if behaviour == "wrapped":
            return f'```\nTemplate: "{template}"\n```'
        if behaviour == "empty":
            return ""
        if behaviour == "refusal":
            return "I'm sorry, but I can't help with that request."
        return template

    @staticmethod
    def _synth_answer(text: str, behaviour: str) -> str:
        examples = [line[2:] for line in re.search(r"<examples>\n(.*?)\n</examples>", text, re.S).group(1).split("\n")]
        n = int(re.search(r"Write (\d+) new templates", text).group(1))
        generated = fake_synthesis(examples, n)
        lines = [f"- {t}" for t in generated] + SYNTH_INVALID + [generated[0]]
        body = "\n".join(lines)
        return f"```text\n{body}\n```" if behaviour == "synth_wrapped" else body

    @staticmethod
    def _vlm_answer(text: str, image: bytes, model: str, behaviour: str) -> str:
        template = re.search(r"<template>(.*?)</template>", text, re.S).group(1)
        max_words = int(re.search(r"at most (\d+) words", text).group(1))
        caption = vlm_fill(template, image, model)
        if '"caption"' in text:
            caption = json.dumps({"caption": caption})
        if behaviour == "wrapped":
            return f'```markdown\nCaption: "{caption}"\n```'
        if behaviour == "empty":
            return "   "
        if behaviour == "refusal":
            return "I'm sorry, I cannot describe people in images."
        if behaviour == "long_sentences":
            return caption + " " + " ".join(["The scene also shows many other details"] * (max_words // 6 + 2)) + "."
        if behaviour == "long_run_on":
            return " ".join(["well"] * (max_words + 5)) + " " + caption
        return caption

    # ---- images

    def image(self, name: str) -> tuple[int, dict, bytes, float]:
        with self.lock:
            self.path_hits[name] += 1
            hits = self.path_hits[name]
        if name in IMAGES:
            data = render(IMAGES[name])
            if name == "flaky" and hits <= 2:
                return 503, {"Content-Type": "text/plain"}, b"busy", 0.0
            if name == "limited" and hits == 1:
                return 429, {"Retry-After": "0", "Content-Type": "text/plain"}, b"slow down", 0.0
            ctype = "application/octet-stream" if name == "octet" else "image/png"
            return 200, {"Content-Type": ctype}, data, 0.0
        if name == "corrupt":
            return 200, {"Content-Type": "image/png"}, b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50, 0.0
        if name == "slow":
            return 200, {"Content-Type": "image/png"}, render(IMAGES["good00"]), SLOW_SECONDS
        if name == "html":
            return 200, {"Content-Type": "text/html; charset=utf-8"}, b"<html>not an image</html>", 0.0
        if name == "fakejpeg":
            return 200, {"Content-Type": "image/jpeg"}, b"<html>an error page</html>", 0.0
        if name == "huge":
            return 200, {"Content-Type": "image/png"}, b"\x89PNG\r\n\x1a\n" + bytes(MAX_BYTES + 1000), 0.0
        if name == "gone500":
            return 500, {"Content-Type": "text/plain"}, b"server error", 0.0
        return 404, {"Content-Type": "text/plain"}, b"not found", 0.0


def _error(status: int, message: str) -> tuple[int, dict, bytes, float]:
    return status, {"Content-Type": "application/json"}, json.dumps({"error": {"message": message}}).encode(), 0.0


class _Handler(BaseHTTPRequestHandler):
    backend: FakeBackend

    def log_message(self, format: str, *args: object) -> None:  # silence the per-request log
        return

    def _send(self, result: tuple[int, dict, bytes, float], track: bool) -> None:
        status, headers, body, delay = result
        if delay:
            time.sleep(delay)
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
        except (BrokenPipeError, ConnectionResetError):
            self._done(track)
            return  # the client gave up (timeout test)
        # The request stops counting as active *before* its last bytes leave: the client
        # cannot finish reading (and start its next request) until they have, so the
        # count can never include a request whose client already moved on.
        self._done(track)
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            return

    def _done(self, track: bool) -> None:
        if track:
            with self.backend.lock:
                self.backend.active -= 1

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        track = name != "slow"  # a timed-out request lingers here after the client let go of its slot
        if track:
            with self.backend.lock:
                self.backend.active += 1
                self.backend.max_active = max(self.backend.max_active, self.backend.active)
        self._send(self.backend.image(name), track)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:
            self._send(_error(400, "body is not JSON"), False)
            return
        if self.path != "/v1/chat/completions":
            self._send(_error(404, f"no route {self.path}"), False)
            return
        self._send(self.backend.chat(body), False)


class FakeServer:
    """``ThreadingHTTPServer`` on 127.0.0.1 (free port) in a daemon thread."""

    def __init__(self) -> None:
        self.backend = FakeBackend()
        handler = type("Handler", (_Handler,), {"backend": self.backend})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def image_url(self, name: str) -> str:
        return f"{self.url}/img/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
