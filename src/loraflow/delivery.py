"""The delivery controller, `mlflow run . -e deliver`: each new version of a registered model with a
delivery policy (configs/deliver/) is taken towards Production with no human step, every move
through the same locked, audited code as the commands (registry_changes.py, rollout.py):

    evaluating -> evaluated -> staged -> canary -> delivered         (or stopped, with the reason)
    evaluate      Staging gate  parity check, then a canary           the servers promote it
                                (Production directly when none is there yet)

A version's state lives in the registry, on the version (registry.DELIVERY_TAG_PREFIX), never only
in memory: a controller claims a version under the registry lock and keeps a heartbeat on it, so two
controllers never deliver the same version, and one started after a crash takes over a version
whose controller is gone (its evaluation, killed with it, is ended KILLED and run again). A
person's change always wins: when Production changes, or the version is moved, while it is being
delivered, the controller stops and says why. New versions are found by polling the registry.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from loraflow import (
    delivery_webhooks,
    job_configs,
    parity,
    processes,
    promotion_gates,
    registry,
    registry_changes,
    registry_lock,
    rollout,
    tracking,
)
from loraflow.envs import PROJECT_ROOT
from loraflow.errors import UserError
from loraflow.job_configs import DeliverConfig, DeliveryPolicy, EvaluateConfig, ServeConfig

# Three tags a version: its state (what the UI shows), its record (JSON: reason, at, since, production,
# eval_run, parity) and the claim of the controller delivering it (JSON: controller, heartbeat).
STATE, RECORD, CLAIM = (registry.DELIVERY_TAG_PREFIX + field for field in ("state", "record", "claim"))
DONE = ("delivered", "stopped")


def job(config: str, once: bool) -> None:
    """The deliver entry point (entry_points.py)."""
    uri = tracking.configure()
    policy = check_policy(config)
    controller, wake = Controller(policy), threading.Event()
    with _webhook(policy, uri, wake, once) as how:
        print(f"deliver: following {', '.join(policy.models)}: {how}" + (" (once)" if once else ""), flush=True)
        while True:
            controller.round()
            if once:
                return
            wake.wait(policy.poll_interval_s)
            wake.clear()


@contextlib.contextmanager
def _webhook(policy: DeliverConfig, uri: str, wake: threading.Event, once: bool):
    """The webhook listener, subscribed on the tracking server, when the policy asks for one; yields
    how the controller learns of new versions."""
    polling = f"polling every {policy.poll_interval_s:g} s"
    if policy.webhook is None or once:
        yield polling
        return
    settings = policy.webhook
    secret = os.environ.get(settings.secret_env)
    if not secret:
        raise UserError(f"webhook: set {settings.secret_env} to the webhook's signing secret (the tracking "
                        "server signs each call with it), or remove webhook from the delivery config.")
    if not uri.startswith(("http://", "https://")):
        raise UserError(f"webhook: webhooks are sent by a tracking server (`mlflow server` on a SQL store), and "
                        f"{tracking.display_uri(uri)} is a local store: set MLFLOW_TRACKING_URI to the server, or "
                        "remove webhook from the delivery config to poll.")
    host, _, port = settings.listen.rpartition(":")
    try:
        listener = delivery_webhooks.Listener(host, int(port), secret, set(policy.models), wake)
    except OSError as exc:
        raise UserError(f"webhook: cannot listen on {settings.listen} ({exc.strerror}): set webhook.listen in the "
                        "delivery config to a free host:port of this machine.") from None
    try:
        delivery_webhooks.subscribe(MlflowClient(), settings.url, secret)
        yield f"webhooks at {settings.url} (listening on {settings.listen}), and {polling}"
    finally:
        listener.close()


def check_policy(path: str) -> DeliverConfig:
    """The delivery config with every config it names loaded and checked, and every registered
    model found: bad input is refused before anything is delivered."""
    policy = job_configs.load(DeliverConfig, path)
    client = MlflowClient()
    for name, model in policy.models.items():
        try:
            job_configs.load(EvaluateConfig, model.evaluate_config)
            promotion_gates.load(model.promote_config)
            if model.parity.rows:
                job_configs.load(ServeConfig, model.parity.serve_config)
            registry.registered_model(client, name)
        except UserError as exc:
            raise UserError(f"Delivery config {path}: models.{name}: {exc}") from None
    return policy


class Controller:
    def __init__(self, policy: DeliverConfig):
        self.policy, self.me = policy, processes.identity()
        self.client = MlflowClient()

    def round(self) -> None:
        """Every registered model's pending versions, oldest first, each as far as it goes now."""
        for name, model in self.policy.models.items():
            try:
                for number in self._pending(name):
                    self._deliver(name, number, model)
            except (MlflowException, OSError) as exc:  # the registry unreachable: this round stops here
                print(f"deliver: {name}: the registry did not answer ({str(exc)[:300]}); retried at the next round",
                      flush=True)

    def _pending(self, name: str) -> list[str]:
        """Versions being delivered, and new ones: never moved by anyone (stage None, no promotion or
        canary record) and not delivered before."""
        pending = []
        for version in self.client.search_model_versions(f"name='{name}'"):
            state = version.tags.get(STATE)
            moved = any(key.startswith((registry.PROMOTION_TAG_PREFIX, registry.CANARY_TAG_PREFIX))
                        for key in version.tags)
            if state not in DONE and (state is not None or (version.current_stage == "None" and not moved)):
                pending.append(str(version.version))
        return sorted(pending, key=int)

    def _deliver(self, name: str, number: str, model: DeliveryPolicy) -> None:
        steps = {None: self._evaluate, "evaluating": self._evaluate, "evaluated": self._stage,
                 "staged": self._go_live, "canary": self._watch}
        with self._beating(name, number):
            while True:
                version = self._claim(name, number)
                if version is None:
                    return
                state = version.tags.get(STATE)
                stopped = self._overruled(version)
                if stopped:
                    self._end(name, number, "stopped", stopped)
                    return
                if not steps[state](version, model):
                    return  # waiting: on the servers' judgement, or on another version's rollout

    # -- the steps: each returns whether the version moved on --------------------------------------
    def _evaluate(self, version, model: DeliveryPolicy) -> bool:
        name, number = version.name, str(version.version)
        since = record_of(version)["since"]
        adopted = self._finished_evaluation(version, since)
        if adopted is None:
            self._end_orphans(name, number, since)
            self._set(name, number, "evaluating", f"with {model.evaluate_config}")
            code = _child("evaluate", "--model", f"models:/{name}/{number}", "--config", model.evaluate_config)
            if code != 0:
                return self._end(name, number, "stopped", f"its evaluation failed (exit code {code}); see the "
                                                          "controller's output and the evaluation run")
            adopted = self._finished_evaluation(self.client.get_model_version(name, number), since)
            if adopted is None:
                return self._end(name, number, "stopped", "its evaluation recorded no figures on it")
        self._update_record(name, number, eval_run=adopted)
        return self._next(name, number, "evaluated", f"evaluation run {adopted}")

    def _stage(self, version, model: DeliveryPolicy) -> bool:
        name, number = version.name, str(version.version)
        result = registry_changes.promote(name, number, "Staging", "delivery: evaluated by the controller",
                                          False, model.promote_config)
        if result.refused:
            return self._end(name, number, "stopped", result.message)
        if model.to == "Staging":
            return self._end(name, number, "delivered", "in Staging, as far as its delivery policy goes")
        return self._next(name, number, "staged", f"Staging gate {result.gate}")

    def _go_live(self, version, model: DeliveryPolicy) -> bool:
        name, number = version.name, str(version.version)
        under_way = registry.rollout(self.client, name)
        if under_way is not None and under_way["version"] != number:
            print(f"deliver: {name} v{number}: waits for v{under_way['version']}'s rollout to end", flush=True)
            return False
        if model.parity.rows and not self._parity(version, model):
            return False
        production = registry_changes.production_of(self.client, name)
        if production is None:
            if model.to == "Canary":
                return self._end(name, number, "stopped", "nothing is in Production for a canary to be judged "
                                 "against: promote a version first, or deliver this one with to: Production")
            result = registry_changes.promote(name, number, "Production", "delivery: the first version in "
                                              "Production (no canary: nothing to compare it with)", False,
                                              model.promote_config)
            state = "stopped" if result.refused else "delivered"
            return self._end(name, number, state, result.message)
        result = rollout.start_canary(name, number, None, "delivery: parity checked", False, model.promote_config)
        if result.refused:
            return self._end(name, number, "stopped", result.message)
        if model.to == "Canary":
            return self._end(name, number, "delivered", result.message + "; the servers judge it")
        return self._next(name, number, "canary", result.message)

    def _watch(self, version, model: DeliveryPolicy) -> bool:
        name, number = version.name, str(version.version)
        if version.current_stage == "Production":
            return self._end(name, number, "delivered", "promoted to Production: the canary held")
        result = version.tags.get(registry.CANARY_TAG_PREFIX + "result")
        if result is not None:
            reason = version.tags.get(registry.CANARY_TAG_PREFIX + "reason", "")
            return self._end(name, number, "stopped", f"canary {result}: {reason}")
        return False

    def _parity(self, version, model: DeliveryPolicy) -> bool:
        name, number = version.name, str(version.version)
        sampling = job_configs.load(EvaluateConfig, model.evaluate_config).sampling
        print(f"deliver: {name} v{number}: parity check on {model.parity.rows} rows", flush=True)
        handle, log = tempfile.mkstemp(prefix=f"loraflow-parity-{name}-v{number}-", suffix=".log")
        os.close(handle)
        try:
            report = parity.check(version, record_of(version)["eval_run"], sampling, model.parity, Path(log))
        except RuntimeError as exc:
            return self._end(name, number, "stopped", f"parity check: {exc}")
        self._update_record(name, number, parity=report.as_record())
        if not report.passed:
            return self._end(name, number, "stopped", f"parity check refused it: {report.summary()}")
        print(f"deliver: {name} v{number}: parity: {report.summary()}", flush=True)
        Path(log).unlink(missing_ok=True)
        return True

    # -- claims, state, a person's changes ---------------------------------------------------------
    def _claim(self, name: str, number: str):
        """The version, claimed by this controller (under the registry lock); None when it is done
        or another live controller delivers it."""
        with registry_changes.changing(self.client, name):
            version = self.client.get_model_version(name, number)
            tags = version.tags
            if tags.get(STATE) in DONE:
                return None
            claim = claim_of(version)
            holder = claim.get("controller")
            if holder and holder != self.me:
                if self._alive(holder, claim.get("heartbeat", 0)):
                    return None
                print(f"deliver: {name} v{number}: taking over from {holder}, which is gone "
                      f"(state {tags.get(STATE)})", flush=True)
            if holder != self.me:
                if RECORD not in tags:
                    production = registry_changes.production_of(self.client, name)
                    self._update_record(name, number, since=time.time(),
                                        production=str(production.version) if production is not None else "")
                self._claim_tag(name, number)
                version = self.client.get_model_version(name, number)
            return version

    @staticmethod
    def _alive(holder: str, heartbeat: float) -> bool:
        alive = processes.alive(holder)
        if alive is not None:
            return alive
        return time.time() - heartbeat < registry_lock.STALE_AFTER_S  # on another host: its heartbeat says

    def _overruled(self, version) -> str | None:
        """Why a person's change stops this delivery, if one does: Production changed (but by this
        version's own canary), or the version was moved."""
        name, state = version.name, version.tags.get(STATE)
        production = registry_changes.production_of(self.client, name)
        now = str(production.version) if production is not None else ""
        was = record_of(version).get("production", "")
        if now != was and now != str(version.version):
            by = production.tags.get(registry.PROMOTION_TAG_PREFIX + "by", "someone") if production else "someone"
            return (f"Production changed during its delivery (v{was or 'none'} -> v{now or 'none'}, by {by}); the controller "
                    "does not overrule that: deliver this version again by hand if it is still wanted")
        expected = {None: ("None",), "evaluating": ("None",), "evaluated": ("None",), "staged": ("Staging",),
                    "canary": ("Staging", "Production")}[state]
        if version.current_stage not in expected:
            by = version.tags.get(registry.PROMOTION_TAG_PREFIX + "by", "someone")
            return f"it was moved to {version.current_stage} by {by} during its delivery; that change stands"
        return None

    def _update_record(self, name: str, number: str, **fields) -> None:
        """Read, change, write: only the claim's holder writes a version's record."""
        record = record_of(self.client.get_model_version(name, number))
        self.client.set_model_version_tag(name, number, RECORD, json.dumps({**record, **fields}, sort_keys=True))

    def _claim_tag(self, name: str, number: str) -> None:
        claim = {"controller": self.me, "heartbeat": time.time()}
        self.client.set_model_version_tag(name, number, CLAIM, json.dumps(claim, sort_keys=True))

    def _next(self, name: str, number: str, state: str, reason: str) -> bool:
        """The version moved on to `state`: its next step follows."""
        self._set(name, number, state, reason)
        return True

    def _end(self, name: str, number: str, state: str, reason: str) -> bool:
        """The version is done (delivered, stopped) or waits for what only others can do."""
        self._set(name, number, state, reason)
        return False

    def _set(self, name: str, number: str, state: str, reason: str) -> None:
        at = registry_changes.now()
        self._update_record(name, number, reason=reason[:2000], at=at)
        self.client.set_model_version_tag(name, number, STATE, state)
        first_line = reason.splitlines()[0] if reason else ""
        registry_changes.note(self.client, name, number, f"delivery: {state} ({first_line})", at)
        print(f"deliver: {name} v{number}: {state}: {reason}", flush=True)

    # -- evaluations -------------------------------------------------------------------------------
    def _finished_evaluation(self, version, since: float) -> str | None:
        """The evaluation recorded on the version since its delivery began, if it finished."""
        run_id = version.tags.get(registry.EVAL_RUN_TAG)
        if run_id is None:
            return None
        run = self.client.get_run(run_id)
        return run_id if run.info.status == "FINISHED" and run.info.start_time / 1000 >= since else None

    def _end_orphans(self, name: str, number: str, since: float) -> None:
        """Evaluations of this version left RUNNING by a controller that died (its evaluation died
        with it: see _child) are ended KILLED."""
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        runs = self.client.search_runs(experiments, f"tags.`{registry.MODEL_REF_TAG}` = 'models:/{name}/{number}' "
                                                    "and attributes.status = 'RUNNING'")
        for run in runs:
            if run.info.start_time / 1000 >= since:
                self.client.set_terminated(run.info.run_id, "KILLED")
                print(f"deliver: {name} v{number}: ended the evaluation run {run.info.run_id} that a controller "
                      "which is gone left RUNNING", flush=True)

    def _beating(self, name: str, number: str):
        """The claim's heartbeat while this controller works on the version."""
        def beat() -> None:
            if claim_of(self.client.get_model_version(name, number)).get("controller") == self.me:
                self._claim_tag(name, number)

        return registry_lock.heartbeat(beat)


def record_of(version) -> dict:
    """A version's delivery record: reason, at, since, production, eval_run, parity."""
    return json.loads(version.tags.get(RECORD, "{}"))


def claim_of(version) -> dict:
    return json.loads(version.tags.get(CLAIM, "{}"))


def _child(entry_point: str, *args: str) -> int:
    """Another entry point as a child process that dies with the controller (a controller killed
    mid-evaluation leaves no evaluation running on: its successor evaluates again)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}  # a run of its own
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "mlproject" / "run.py"), entry_point, *args],
                          cwd=PROJECT_ROOT, env=env, check=False, preexec_fn=_die_with_parent).returncode


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
