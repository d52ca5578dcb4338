"""Webhook delivery when a TranscriptionJob succeeds, fails or is cancelled.

Payloads are the original API's, so existing receivers keep working (``task_id`` is the
client's task id: the annotation ``ifw.dev/task-id`` when the gateway set one, else the name):

- success: ``{"output": <the original API's json>, "status": "completed", "task_id": <id>}``
- failure: ``{"error": <message>, "status": "error", "task_id": <id>}``
- cancellation (the job was deleted before it finished; the original API had none, this
  follows its error payload): ``{"error": "Task Cancelled", "status": "cancelled", "task_id": <id>}``
- each also carries ``processed_by`` (the original's ``fly_machine_id``: who did the work) when
  known: ``{pod, node, runtime}`` from the transcript, or for a failure the runtime and pool worker.

Beyond the original: signed per the Standard Webhooks spec (``webhook-id`` stable across
retries so receivers can drop duplicates, ``webhook-timestamp``, ``webhook-signature`` =
HMAC-SHA256 with the operator's signing key; the id is ``<uid>-<event>``, event one of
``succeeded``, ``failed``, ``cancelled``), the user's extra headers come from a Secret
(``spec.webhook.headersSecretRef``), a timeout per attempt, bounded retries with exponential
backoff (tenacity) on network errors, 408, 429 and 5xx, and every attempt recorded in
``status.webhook``. The destination goes through the SSRF guard (ifw.core.netguard): only
public addresses unless the operator's allowlist says otherwise, checked at connect time.

``WebhookSender`` only delivers; the Controller is handed one and decides when: it runs each
delivery as a task beside the reconcile (a slow receiver never holds a job up), and its TTL
deletion (or, for a cancelled job, the removal of its finalizer) waits until delivery has
succeeded or given up. Delivery survives a restart: the attempt count lives in the status and
``delivered`` stops any resend. It is at least once: an operator killed after the receiver got
a request but before it recorded the answer sends it again, with the same ``webhook-id``, so a
receiver that drops ids it has seen handles each event once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import httpx
from standardwebhooks import Webhook
from tenacity import AsyncRetrying, RetryError, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from ifw.core import formats, netguard, results
from ifw.core.contract import ANNOTATION_TASK_ID, format_time, is_terminal
from ifw.core.kube import api_message
from ifw.core.transcript import Transcript
from ifw.operator import metrics
from ifw.operator.config import OperatorSettings
from ifw.operator.kube import Kube

log = logging.getLogger("ifw.operator.webhooks")

# Headers the operator sets; a user's header Secret cannot replace them.
RESERVED_HEADERS = frozenset({"content-type", "webhook-id", "webhook-timestamp", "webhook-signature", "host",
                              "content-length"})
USER_AGENT = "ifw-operator-webhooks/0.1.0"
# Where to let a private destination through: named in the SSRF refusal, so people know what to change.
ALLOWLIST_SETTING = "the operator's webhook allowlist (Helm operator.webhook.allowlist, config webhook.allowlist)"


class DeliveryFailed(Exception):
    def __init__(self, message: str, *, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


def success_payload(name: str, output: Any) -> dict[str, Any]:
    return {"output": output, "status": "completed", "task_id": name}


def error_payload(name: str, message: str) -> dict[str, Any]:
    return {"error": message, "status": "error", "task_id": name}


def cancelled_payload(name: str) -> dict[str, Any]:
    return {"error": "Task Cancelled", "status": "cancelled", "task_id": name}


def event_of(tj: dict[str, Any]) -> str:
    """What the webhook reports: cancelled (deleted before it finished), else succeeded or failed."""
    if tj["metadata"].get("deletionTimestamp") and not is_terminal(tj):
        return "cancelled"
    return ((tj.get("status") or {}).get("phase") or "").lower()


def processed_by(tj: dict[str, Any], transcript: Transcript | None = None) -> dict[str, str] | None:
    """Who did the work: the runner's own account in the transcript, else what the status says."""
    if transcript is not None and (machine := formats.processed_by(transcript)) is not None:
        return machine
    status = tj.get("status") or {}
    found = {"pod": (status.get("execution") or {}).get("worker"), "runtime": status.get("runtime")}
    return {key: value for key, value in found.items() if value} or None


def _with_machine(payload: dict[str, Any], machine: dict[str, str] | None) -> dict[str, Any]:
    return payload if machine is None else {**payload, "processed_by": machine}


def task_id(tj: dict[str, Any]) -> str:
    """The client's id of the task (the gateway keeps one that is no valid name in an annotation)."""
    meta = tj["metadata"]
    return (meta.get("annotations") or {}).get(ANNOTATION_TASK_ID) or meta["name"]


def refusal(error: netguard.DestinationNotAllowed) -> str:
    """The SSRF guard's refusal, pointing at the setting that would allow it."""
    reason = error.reason
    where = f"{error.host} ({error.address})" if error.address and error.address != error.host else error.host
    return (f"refused by the SSRF guard: {where} is not allowed ({reason}); "
            f"to send webhooks there, add it to {ALLOWLIST_SETTING}")


def sign(secret: str | None, msg_id: str, body: str, when: datetime) -> dict[str, str]:
    """Standard Webhooks headers; without a signing key only id and timestamp are sent."""
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(when.timestamp()))}
    if secret:
        headers["webhook-signature"] = Webhook(secret).sign(msg_id, when, body)
    return headers


def _retryable(error: BaseException) -> bool:
    return isinstance(error, DeliveryFailed) and error.retryable


class WebhookSender:
    """Sends a finished job's webhook. The Controller decides when and keeps the task; this only delivers."""

    def __init__(self, settings: OperatorSettings, kube: Kube):
        self.config = settings.webhook
        self.kube = kube
        self.event_component = settings.event_component

    def owed(self, tj: dict[str, Any]) -> bool:
        """Whether the job's status still owes a webhook (the attempt count survives restarts)."""
        if not (tj.get("spec") or {}).get("webhook"):
            return False
        state = (tj.get("status") or {}).get("webhook") or {}
        return not state.get("delivered") and state.get("attempts", 0) < self.config.max_attempts

    async def deliver(self, tj: dict[str, Any], on_written: Callable[[dict[str, Any]], None]) -> None:
        """Send it, retrying what may pass later; each attempt goes to status.webhook, then ``on_written``."""
        meta = tj["metadata"]
        state = dict((tj.get("status") or {}).get("webhook") or {})
        try:
            body = json.dumps(await self._payload(tj), ensure_ascii=False, separators=(",", ":"))
            extra = await self._user_headers(meta["namespace"], tj["spec"]["webhook"].get("headersSecretRef"))
        except DeliveryFailed as error:
            await self._record(tj, state, on_written, delivered=False, error=str(error), final=True)
            return
        await self._send(tj, body, extra, state, on_written)

    async def _send(
        self, tj: dict[str, Any], body: str, extra: dict[str, str], state: dict[str, Any],
        on_written: Callable[[dict[str, Any]], None],
    ) -> None:
        """POST until delivered, a final answer, or the attempts left run out (exponential backoff)."""
        config = self.config
        # One id per job and event: the same across retries and operator restarts.
        msg_id = f"{tj['metadata']['uid']}-{event_of(tj)}"
        attempts_left = config.max_attempts - state.get("attempts", 0)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(max(1, attempts_left)),
            wait=wait_exponential_jitter(multiplier=config.backoff_initial_seconds, max=config.backoff_max_seconds),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
        async with netguard.guarded_async_client(
            config.allowlist, timeout=httpx.Timeout(config.timeout_seconds), headers={"user-agent": USER_AGENT}
        ) as client:
            try:
                async for try_ in retrying:
                    with try_:
                        try:
                            await self._post(client, tj["spec"]["webhook"]["url"], body, extra, msg_id)
                        except DeliveryFailed as error:
                            final = not error.retryable or try_.retry_state.attempt_number >= attempts_left
                            state = await self._record(tj, state, on_written, delivered=False, error=str(error),
                                                       final=final)
                            raise
                await self._record(tj, state, on_written, delivered=True, error=None, final=True)
            except (DeliveryFailed, RetryError):
                pass

    async def _post(self, client: httpx.AsyncClient, url: str, body: str, extra: dict[str, str], msg_id: str) -> None:
        """One attempt; DeliveryFailed says whether another one may succeed."""
        secret = self.config.signing_secret.get_secret_value() if self.config.signing_secret else None
        now = datetime.now(timezone.utc)
        headers = {**extra, "content-type": "application/json", **sign(secret, msg_id, body, now)}
        try:
            response = await client.post(url, content=body.encode(), headers=headers)
        except netguard.DestinationNotAllowed as error:
            raise DeliveryFailed(refusal(error), retryable=False) from error
        except httpx.HTTPError as error:
            raise DeliveryFailed(f"{type(error).__name__}: {error}", retryable=True) from error
        if response.is_success:
            return
        retryable = response.status_code in (408, 429) or response.status_code >= 500
        raise DeliveryFailed(f"the receiver answered HTTP {response.status_code}", retryable=retryable)

    async def _payload(self, tj: dict[str, Any]) -> dict[str, Any]:
        meta, status = tj["metadata"], tj.get("status") or {}
        event = event_of(tj)
        if event == "cancelled":
            return _with_machine(cancelled_payload(task_id(tj)), processed_by(tj))
        if event != "succeeded":
            message = status.get("message") or status.get("reason") or "failed"
            return _with_machine(error_payload(task_id(tj), message), processed_by(tj))
        ref = status.get("result")
        if not ref:
            raise DeliveryFailed("the job succeeded but status.result is missing", retryable=False)
        try:
            transcript = await asyncio.get_running_loop().run_in_executor(
                None, lambda: results.load_result(ref, meta["namespace"], job_uid=meta["uid"], core_v1=self.kube.core,
                                                  settings=results.ResultSettings()),
            )
        except Exception as error:  # the result is gone or unreadable: say so instead of sending nothing
            raise DeliveryFailed(f"cannot read the result: {error}", retryable=False) from error
        payload = success_payload(task_id(tj), formats.render_object(transcript, "json"))
        return _with_machine(payload, processed_by(tj, transcript))

    async def _user_headers(self, namespace: str, ref: dict[str, Any] | None) -> dict[str, str]:
        if not ref:
            return {}
        try:
            secret = await self.kube.read("Secret", namespace, ref["name"])
        except Exception as error:
            raise DeliveryFailed(f"cannot read headers Secret {ref['name']}: {api_message(error)}",
                                 retryable=False) from error
        if secret is None:
            raise DeliveryFailed(f"headers Secret {ref['name']} not found", retryable=False)
        headers = {}
        for key, value in (secret.get("data") or {}).items():
            if key.lower() not in RESERVED_HEADERS:
                headers[key] = base64.b64decode(value).decode()
        return headers

    async def _record(
        self, tj: dict[str, Any], state: dict[str, Any], on_written: Callable[[dict[str, Any]], None], *,
        delivered: bool, error: str | None, final: bool,
    ) -> dict[str, Any]:
        """One attempt into status.webhook (and metrics, logs, an Event when it is over)."""
        meta = tj["metadata"]
        state = {
            "attempts": state.get("attempts", 0) + 1,
            "delivered": delivered,
            "lastAttemptTime": format_time(datetime.now(timezone.utc)),
            "lastError": error[:4000] if error else None,
        }
        metrics.WEBHOOK_DELIVERIES_TOTAL.labels("delivered" if delivered else "failed").inc()
        try:
            on_written(await self.kube.patch_tj_status(meta["namespace"], meta["name"], {"webhook": state}))
        except Exception as patch_error:  # the job may be gone (cancelled): nothing left to record on
            log.warning("cannot record webhook state on %s: %s", meta["name"], api_message(patch_error))
        await self._announce(tj, state, delivered=delivered, error=error, final=final)
        return state

    async def _announce(
        self, tj: dict[str, Any], state: dict[str, Any], *, delivered: bool, error: str | None, final: bool
    ) -> None:
        """A log line when it is over, and an Event when it failed for good."""
        meta = tj["metadata"]
        if delivered:
            log.info("%s/%s: %s webhook delivered to %s", meta["namespace"], meta["name"], event_of(tj), _host(tj))
        elif final:
            log.warning("%s/%s: webhook to %s failed for good after %s attempts: %s", meta["namespace"],
                        meta["name"], _host(tj), state["attempts"], error)
            try:
                await self.kube.event(tj, type_="Warning", reason="WebhookFailed", message=error or "",
                                      component=self.event_component)
            except Exception as event_error:
                log.warning("could not post an Event on %s: %s", meta["name"], api_message(event_error))


def _host(tj: dict[str, Any]) -> str:
    return httpx.URL(tj["spec"]["webhook"]["url"]).host
