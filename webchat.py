"""
Chat with a model in the browser: a local web page that streams each reply as the model decodes it.

sample.py starts it once the checkpoint is loaded, with the model on its device and in its dtype:

    python sample.py --out_dir=out-sft --serve=8000              # then open http://127.0.0.1:8000
    python sample.py --out_dir=out-shakespeare --serve=8000      # a base model: plain continuation

The page is webchat.html, one static file (inline CSS and JavaScript, nothing fetched from
elsewhere, so it works offline). It keeps the conversation and posts it whole with every message;
the server renders it with the chat template of the checkpoint's tokenizer
(bpe.Tokenizer.render_prompt), where message contents are encoded as plain text: a user who types
"<|end|>" or "<|assistant|>" sends those characters, and cannot close a turn or open one. A base
model (sample.py: a checkpoint of train.py, or one whose tokenizer has no chat tokens) continues a
prompt instead.

    GET  /          the page
    GET  /info      {"name", "chat", "tokenizer", "block_size", "rolling", "system",
                     "defaults": {"temperature", "top_k", "max_tokens"}}
    POST /generate  Content-Type: application/json
                    {"messages": [{"role": "user", "content": "Hi"}, ...]}   (a chat model), or
                    {"prompt": "ROMEO:"}                                     (any model)
                    and optionally "temperature" (0 = greedy), "top_k" (0 = all), "max_tokens"
    answers a stream of server-sent events:
        event: start   data: {"prompt_tokens": 14}
        event: token   data: {"text": "Hel"}       new text: whole characters only, so a character
                                                   whose UTF-8 bytes span two tokens comes whole
        event: done    data: {"stopped": "end" | "max_tokens" | "server stopped", "tokens": 12, "seconds": 0.09,
                              "tokens_per_s": 133.3}
        event: error   data: {"error": "..."}      the decode failed; the server keeps serving
    or, for a request it cannot take, HTTP 400 and {"error": "..."} naming the field at fault;
    a prompt and max_tokens that do not fit block_size are refused with the numbers (a model with
    a rolling cache has no such limit).

"stopped": "end" means the model closed its reply (<|end|>, or <|endoftext|> for a document);
"max_tokens" means it was cut there; "server stopped", that the server was stopped (Ctrl-C) during
the reply. tokens counts every token sampled, the closing one included,
and tokens_per_s divides it by the whole reply's time, prefill included.

One reply is generated at a time (a lock: a second request waits for the first). The page's stop
button closes the stream, and so does closing the tab: the server sees the next token it sends
fail and ends the decode there, a token or two later.

The server binds to 127.0.0.1, so only this machine reaches it. --host=0.0.0.0 (or a LAN address)
serves every machine that can reach the port, with no password and no encryption, on this
machine's compute: do that only on a network you trust.
"""

import codecs
import json
import math
import os
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import bpe
import conversations

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "webchat.html")
MAX_BODY = 1 << 20  # bytes: a request larger than this is refused before it is read
FIELDS = ("messages", "prompt", "temperature", "top_k", "max_tokens")


class Chat:
    """A loaded model behind the page: checks a request, renders its prompt, streams the reply."""

    def __init__(self, model, tokenizer, device, amp, name, chat, system="", temperature=0.8, top_k=200, top_p=1.0,
                 max_tokens=500, use_cache=True, seed=1337):
        """chat: a chat model (messages in the chat template), else a base model (a prompt to continue)."""
        if chat and not bpe.has_chat_template(tokenizer):
            raise ValueError(f"a chat needs the chat tokens <|user|>, <|assistant|>, <|end|>; this {tokenizer.kind} "
                             f"tokenizer has {list(tokenizer.special_tokens)}")
        self.model, self.tokenizer, self.amp, self.name, self.chat = model, tokenizer, amp, name, chat
        self.system, self.top_p, self.use_cache = system, top_p, use_cache
        cfg = model.config
        self.block_size, self.rolling = cfg.block_size, cfg.unbounded_positions
        # the page's default must fit: half the context for the reply, as the terminal chat leaves it
        room = max_tokens if self.rolling else min(max_tokens, cfg.block_size // 2)
        self.defaults = {"temperature": temperature, "top_k": top_k, "max_tokens": max(1, room)}
        specials = tokenizer.special_tokens
        self.stops = {specials[name] for name in ("<|end|>", "<|endoftext|>") if name in specials}
        self.generator = torch.Generator(device).manual_seed(seed)
        self.device = device
        self.lock = threading.Lock()  # one decode at a time: one model, one cache, one generator
        self.stopping = threading.Event()  # set on Ctrl-C: a decode under way ends at its next token

    def info(self):
        return {"name": self.name, "chat": self.chat, "tokenizer": self.tokenizer.kind, "block_size": self.block_size,
                "rolling": self.rolling, "system": self.system if self.chat else "", "defaults": self.defaults}

    def parse(self, body):
        """The raw JSON body of a request -> the keyword arguments of stream(). Raises ValueError
        with a message for the page, naming the field at fault."""
        try:
            req = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"the request is not valid JSON ({e})") from None
        if not isinstance(req, dict):
            raise ValueError(f"the request must be a JSON object, got {type(req).__name__}")
        unknown = sorted(set(req) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
        if ("messages" in req) == ("prompt" in req):
            raise ValueError("send 'messages' (a conversation) or 'prompt' (text to continue), one of them")
        temperature = number(req, "temperature", self.defaults["temperature"], float, 0)
        top_k = number(req, "top_k", self.defaults["top_k"], int, 0)
        max_tokens = number(req, "max_tokens", self.defaults["max_tokens"], int, 1)
        if "messages" in req:
            ids = self.render(req["messages"])
        else:
            if not isinstance(req["prompt"], str):
                raise ValueError(f"'prompt' must be a string, got {req['prompt']!r:.40}")
            if not req["prompt"].strip():
                raise ValueError("the prompt is empty")
            ids = self.tokenizer.encode(req["prompt"])  # special-token strings stay plain text
        if not self.rolling and len(ids) + max_tokens > self.block_size:
            raise ValueError(f"too long: the prompt is {len(ids)} tokens and max_tokens {max_tokens}, "
                             f"{len(ids) + max_tokens} in all, but the model reads at most block_size="
                             f"{self.block_size}; start a new conversation or lower max_tokens")
        return {"ids": ids, "temperature": temperature, "top_k": top_k, "max_tokens": max_tokens}

    def render(self, messages):
        """A conversation from the page -> the prompt's ids, with the chat template."""
        if not self.chat:
            raise ValueError("this is a base model, not a chat model: send 'prompt', text for it to continue")
        messages = conversations.messages_of({"messages": messages})
        if messages[-1]["role"] != "user":
            raise ValueError(f"'messages' must end with the user's message, not the {messages[-1]['role']}'s")
        if not messages[-1]["content"].strip():
            raise ValueError("the message is empty")
        if self.system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system}] + messages
        return self.tokenizer.render_prompt(messages)

    def stream(self, ids, temperature, top_k, max_tokens):
        """Yield the events of one reply, (name, data): start, then token after token, then done
        (or error). Closing the generator ends the decode."""
        with self.lock:
            yield "start", {"prompt_tokens": len(ids)}
            # the bytes of one character may be split over tokens: decode them incrementally
            utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            prompt = torch.tensor(ids, dtype=torch.long, device=self.device)[None]
            n, stopped, t0 = 0, "max_tokens", time.perf_counter()
            try:
                with self.amp:
                    for token, _ in self.model.generate_tokens(prompt, max_tokens, temperature, top_k or None,
                                                               self.top_p if self.top_p < 1.0 else None,
                                                               self.use_cache, self.generator,
                                                               vocab_limit=self.tokenizer.n_vocab):
                        if self.stopping.is_set():  # the server is shutting down: end the reply here
                            stopped = "server stopped"
                            break
                        n += 1
                        token = int(token[0])
                        if token in self.stops:  # the model closes its reply
                            stopped = "end"
                            break
                        text = utf8.decode(self.tokenizer.decode_bytes([token]))
                        if text:
                            yield "token", {"text": text}
            except Exception as e:  # noqa: BLE001  (the page hears of it; the server goes on)
                traceback.print_exc()
                yield "error", {"error": f"the decode failed: {type(e).__name__}: {e}"}
                return
            text = utf8.decode(b"", final=True)  # a character cut short by max_tokens
            if text:
                yield "token", {"text": text}
            seconds = time.perf_counter() - t0
            print(f"[reply: {n} tokens in {seconds:.2f}s, {n / seconds:.0f} tokens/s, stopped: {stopped}]",
                  file=sys.stderr)
            yield "done", {"stopped": stopped, "tokens": n, "seconds": round(seconds, 4),
                           "tokens_per_s": round(n / seconds, 1)}


def number(req, key, default, kind, low):
    """req[key] (default where absent) checked as an int, or a float (an int accepted), >= low."""
    value = req.get(key, default)
    ok = isinstance(value, int) or (kind is float and isinstance(value, float) and math.isfinite(value))
    if isinstance(value, bool) or not ok:
        raise ValueError(f"'{key}' must be {'a number' if kind is float else 'an integer'}, got {value!r:.40}")
    if value < low:
        raise ValueError(f"'{key}' must be >= {low}, got {value}")
    return kind(value)


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.0: each response ends by closing the connection, which is how the stream ends too."""

    def do_GET(self):
        if self.path in ("/", "/index.html"):
            self.send_body(200, "text/html; charset=utf-8", self.server.page)
        elif self.path == "/info":
            self.send_json(200, self.server.chat.info())
        else:
            self.send_json(404, {"error": f"no page {self.path}"})

    def do_POST(self):
        if self.path != "/generate":
            return self.send_json(404, {"error": f"no endpoint {self.path}; POST to /generate"})
        # JSON only: a page on another site cannot send this content type here without the
        # server's consent (a CORS preflight, which this server never answers)
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return self.send_json(400, {"error": "send the request with Content-Type: application/json"})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self.send_json(400, {"error": "the request needs a Content-Length"})
        if length > MAX_BODY:
            return self.send_json(413, {"error": f"the request is {length} bytes, more than {MAX_BODY}"})
        try:
            request = self.server.chat.parse(self.rfile.read(length))
        except ValueError as e:
            return self.send_json(400, {"error": str(e)})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        events = self.server.chat.stream(**request)
        try:
            for name, data in events:
                self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            print("[reply: the client closed the stream; decode stopped]", file=sys.stderr)
        finally:
            events.close()  # leaves the decode loop and releases the lock, now rather than at garbage collection

    def send_json(self, status, obj):
        self.send_body(status, "application/json", json.dumps(obj).encode())

    def send_body(self, status, content_type, body):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        # the page loads nothing from elsewhere; the browser holds it to that
        self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'; "
                         "script-src 'unsafe-inline'; img-src data:")
        self.end_headers()
        self.wfile.write(body)


def make_server(chat, host="127.0.0.1", port=0):
    """A ThreadingHTTPServer for chat, bound (port 0: any free one, in server.server_address)."""
    server = ThreadingHTTPServer((host, port), Handler)
    # handler threads that server_close() joins: a reply still being written when Ctrl-C comes ends
    # (chat.stopping) and is joined before the interpreter exits, instead of a daemon thread dying
    # inside torch or holding stderr's lock at shutdown (which aborts the process)
    server.daemon_threads = False
    server.chat = chat
    with open(PAGE, "rb") as f:
        server.page = f.read()
    return server


def serve(chat, host, port):
    """Serve the page until Ctrl-C."""
    try:
        server = make_server(chat, host, port)
    except OSError as e:  # the port taken, an address this machine does not have
        raise ValueError(f"cannot serve on {host}:{port}: {e}") from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: anyone who can reach port {port} can use this model, "
              f"with no password", file=sys.stderr)
    kind = "chat" if chat.chat else "base model: continuation"
    print(f"serving {chat.name} ({kind}) at http://{host}:{server.server_address[1]}/ ; Ctrl-C stops",
          file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        chat.stopping.set()
        server.server_close()  # joins the handler threads
