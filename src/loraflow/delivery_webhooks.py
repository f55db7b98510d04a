"""Registry events for the delivery controller: MLflow 3's webhooks (`model_version.created`), sent
by a tracking server on a SQL store to the controller's listener, each signed with the webhook's
secret (HMAC-SHA256 over `<delivery id>.<timestamp>.<body>`, mlflow/webhooks/delivery.py). A call
with a missing or forged signature, or an old timestamp (a replay), is answered 401 and changes
nothing; a good one wakes the controller, which then polls at once (its claims keep delivery
exactly once, whichever way it learnt of a version). Polling goes on beside it: a webhook lost on
the way costs one poll interval."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mlflow import MlflowClient
from mlflow.webhooks.constants import (
    WEBHOOK_DELIVERY_ID_HEADER,
    WEBHOOK_SIGNATURE_HEADER,
    WEBHOOK_SIGNATURE_VERSION,
    WEBHOOK_TIMESTAMP_HEADER,
)

WEBHOOK_NAME = "loraflow-deliver"
EVENT = "model_version.created"
MAX_AGE_S = 300  # a signed call older than this is refused as a replay
MAX_BODY = 1 << 20

logger = logging.getLogger("loraflow.deliver")


def refusal(secret: str, headers, body: bytes, now: float | None = None) -> str | None:
    """Why a webhook call is not to be trusted, or None when its signature is the secret's."""
    signature, delivery_id = headers.get(WEBHOOK_SIGNATURE_HEADER), headers.get(WEBHOOK_DELIVERY_ID_HEADER)
    timestamp = headers.get(WEBHOOK_TIMESTAMP_HEADER)
    if not (signature and delivery_id and timestamp):
        return "unsigned: the webhook needs the controller's secret"
    try:
        age = (now or time.time()) - int(timestamp)
    except ValueError:
        return "the timestamp is not a number"
    if abs(age) > MAX_AGE_S:
        return f"the timestamp is {age:.0f} s old (at most {MAX_AGE_S})"
    content = f"{delivery_id}.{timestamp}.{body.decode('utf-8', errors='replace')}".encode()
    expected = base64.b64encode(hmac.new(secret.encode(), content, hashlib.sha256).digest()).decode()
    if not hmac.compare_digest(signature, f"{WEBHOOK_SIGNATURE_VERSION},{expected}"):
        return "the signature does not match the controller's secret"
    return None


class Listener:
    """The controller's webhook endpoint on `host:port`: sets `wake` for a new version of a model
    it delivers."""

    def __init__(self, host: str, port: int, secret: str, models: set[str], wake: threading.Event):
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    return self._answer(413, {"error": "too large"})
                body = self.rfile.read(length)
                why = refusal(secret, self.headers, body)
                if why is not None:
                    logger.warning("webhook call from %s refused: %s", self.client_address[0], why)
                    return self._answer(401, {"error": why})
                event = json.loads(body or b"{}")
                name = (event.get("data") or {}).get("name")
                if f"{event.get('entity')}.{event.get('action')}" == EVENT and name in models:
                    listener.received += 1
                    wake.set()
                return self._answer(200, {"ok": True})

            def _answer(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # quiet: refusals are logged above
                pass

        self.received = 0
        self.server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def subscribe(client: MlflowClient, url: str, secret: str) -> str:
    """The tracking server's webhook to the controller (made, or updated to `url` and `secret`); its id."""
    existing = next((hook for hook in client.list_webhooks() if hook.name == WEBHOOK_NAME), None)
    description = "new model versions, for loraflow's delivery controller (mlflow run . -e deliver)"
    if existing is None:
        return client.create_webhook(WEBHOOK_NAME, url, [EVENT], description=description, secret=secret).webhook_id
    client.update_webhook(existing.webhook_id, url=url, events=[EVENT], secret=secret, status="ACTIVE")
    return existing.webhook_id
