"""What the ablation and the tuner share to spread work over many workers: an Optuna RDB storage
with heartbeats (a dead worker's trial is retried by the others) and the heartbeat itself."""

from __future__ import annotations

import threading

import optuna

from .tracking import first_use_lock


def open_storage(url: str, heartbeat: int) -> optuna.storages.RDBStorage:
    kwargs: dict = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 5}  # an unreachable host fails in seconds
    try:
        with first_use_lock(url):  # the first worker creates the schema, alone
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat, grace_period=heartbeat * 3,
                heartbeat_stale_trial_callback=optuna.storages.RetryFailedTrialCallback(
                    max_retry=3),
                engine_kwargs=kwargs)
    except Exception as e:  # sqlalchemy/psycopg2 raise many kinds; all mean the same here
        raise ConnectionError(f"Optuna storage {url} is not usable: "
                              f"{str(e).splitlines()[0][:300]}") from None


class Heartbeat:
    """Records the trial's heartbeat from a thread while the cell trains."""

    def __init__(self, storage, trial_id: int, interval: int):
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._beat, args=(storage, trial_id, interval),
                                   daemon=True)

    def _beat(self, storage, trial_id: int, interval: int) -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a missed beat is retried; the grace period covers several
                pass
            if self._stop.wait(interval):
                return

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=5)
