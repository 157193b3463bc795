"""Cron schedules for retrain_cron, with Jenkins-style H resolved by mlpipe.schedule (the one implementation).

    {{ schedule | mlpipe_cron_fields(name) }}   -> {minute, hour, day, month, weekday} for ansible.builtin.cron
    {{ schedule | mlpipe_cron_expand(name) }}   -> "m h dom mon dow"
    {{ schedule | mlpipe_cron_fields(name, 'monitor') }}   the same; errors name the monitor schedule

An empty schedule (none, "") is the spec's default retrain schedule (mlpipe.spec.RETRAIN_DEFAULTS). Runs on the controller,
which must run the Python that has mlpipe installed (the project's venv).
"""
from __future__ import annotations

from ansible.errors import AnsibleFilterError


def _schedule_module():
    try:
        from mlpipe import schedule, spec
    except ImportError as exc:
        import sys
        raise AnsibleFilterError(
            f"retrain_cron resolves cron schedules with mlpipe.schedule, which the controller's Python "
            f"({sys.executable}) cannot import ({exc}). Run ansible-playbook from the virtualenv that has mlpipe "
            f"installed (e.g. .venv/bin/ansible-playbook, or pip install -e . into this one).") from None
    return schedule, spec


def _resolve(schedule, name, what, kind="retrain"):
    mod, spec = _schedule_module()
    if schedule is None or (isinstance(schedule, str) and not schedule.strip()):
        schedule = spec.RETRAIN_DEFAULTS["schedule"]
    if not isinstance(name, str) or not name:
        raise AnsibleFilterError(f"{what}: the model name must be a non-empty string, got {name!r}")
    try:
        return getattr(mod, what)(str(schedule), name)
    except mod.ScheduleError as exc:
        raise AnsibleFilterError(f"{kind} schedule {schedule!r} of model {name!r}: {exc} "
                                 f'(five cron fields, H for a value derived from the model name, e.g. "H 3 * * *")') from None


def mlpipe_cron_fields(schedule, name, kind="retrain"):
    """{minute, hour, day, month, weekday} with every H resolved for the model ``name``."""
    return _resolve(schedule, name, "fields", kind)


def mlpipe_cron_expand(schedule, name, kind="retrain"):
    """The five-field schedule with every H resolved for the model ``name``."""
    return _resolve(schedule, name, "expand", kind)


class FilterModule:
    def filters(self):
        return {"mlpipe_cron_fields": mlpipe_cron_fields, "mlpipe_cron_expand": mlpipe_cron_expand}
