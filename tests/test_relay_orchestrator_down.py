"""When the orchestrator fails around a task (Prefect's API gone), the run's work is neither lost
nor done twice: the relay runs it on the worker, or keeps the result the body already produced."""

from __future__ import annotations

import threading

from apt_stream.flows.relay import RunChannel, body_entered, body_returned


class _Header:
    run_uid = "r1"


def _task(*, fail_before: bool = False, fail_after: bool = False, calls: list):
    def fn(x):
        body_entered()
        calls.append(x)
        body_returned(x * 2)
        return x * 2

    fn.marks_body = True

    class Task:  # what a Prefect task looks like to the relay: callable, with .fn
        def __call__(self, x):
            if fail_before:
                raise ConnectionError("API unreachable before the task ran")
            result = fn(x)
            if fail_after:
                raise ConnectionError("API unreachable when recording the end")
            return result

    Task.fn = staticmethod(fn)
    return Task()


def _flow(channel: RunChannel, done: threading.Event) -> None:
    for call in channel.calls():
        with call:
            call.execute()
    done.set()


def _submit_through_flow(task):
    channel = RunChannel(_Header(), attach_timeout_s=5, poll_s=0.01)
    done = threading.Event()
    threading.Thread(target=_flow, args=(channel, done), daemon=True).start()
    result = channel.submit("finish_angle", task, (21,))
    return result, channel


def test_a_failure_before_the_body_runs_the_work_on_the_worker():
    calls: list = []
    result, channel = _submit_through_flow(_task(fail_before=True, calls=calls))
    assert result == 42 and calls == [21]  # done once, on the worker
    assert channel.closed  # the rest of the run goes on without the orchestrator


def test_a_failure_after_the_body_keeps_its_result():
    calls: list = []
    result, channel = _submit_through_flow(_task(fail_after=True, calls=calls))
    assert result == 42 and calls == [21]  # not done twice
    assert channel.closed


def test_the_bodys_own_error_is_still_raised():
    def fn(x):
        body_entered()
        raise ValueError("bad input")

    fn.marks_body = True

    class Task:
        def __call__(self, x):
            return fn(x)

    Task.fn = staticmethod(fn)
    channel = RunChannel(_Header(), attach_timeout_s=5, poll_s=0.01)
    threading.Thread(target=_flow, args=(channel, threading.Event()), daemon=True).start()
    try:
        channel.submit("finish_angle", Task(), (1,))
    except ValueError as exc:
        assert "bad input" in str(exc)
    else:
        raise AssertionError("the task's own error was swallowed")


def test_a_flow_runs_end_is_recorded_once_prefect_answers_again(prefect_harness, tmp_path):
    """The state catch-up against a real Prefect server: while the API is unreachable the state
    waits (and the probe fails fast); once it answers, the run is set Completed."""
    import time

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Running

    from apt_stream.flows.state_catchup import StateCatchUp

    @flow(name="catchup-probe")
    def probe() -> None: ...

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(probe, state=Running())
    path = tmp_path / "pending.json"
    StateCatchUp(path=path).add(str(run.id), {"run_uid": "r1", "status": "done"})
    catchup = StateCatchUp(path=path)  # a listener started later picks it up
    assert catchup.pending == [str(run.id)]
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # down
        t0 = time.monotonic()
        assert catchup.try_now() == 0
        assert time.monotonic() - t0 < 5  # not Prefect's minute of retries
    assert catchup.pending == [str(run.id)]
    assert catchup.try_now() == 1  # back
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert state.type.value == "COMPLETED" and "after a Prefect outage" in state.message
    assert catchup.pending == [] and StateCatchUp(path=path).pending == []
