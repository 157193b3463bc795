"""Errors mlpipe raises on purpose, each with an exit code and an HTTP status.

    MlpipeError                     exit 1 / HTTP 500
    ├── UsageError                  exit 3 / 400   bad arguments
    ├── SpecError                   exit 3 / 400   pipeline spec malformed or invalid
    ├── DataError                   exit 4 / 400   a data source cannot be read or lacks a column
    ├── NotFound                    exit 5 / 404   unknown model, version or alias
    ├── IntegrityError              exit 6 / 409   an artifact whose sha256 does not match
    ├── LibraryMismatch             exit 9 / 409   a version trained with another scikit-learn major.minor
    ├── RegistryError               exit 7 / 503   the registry backend failed or is unreachable
    │   └── Conflict                exit 7 / 409   a key already exists (lost an allocation race)
    ├── Locked                      exit 8 / 423   another deploy or rollback of the model holds its lock
    ├── ValidationError             exit 3 / 400   a request's inputs do not fit the model signature
    │   ├── PayloadTooLarge         exit 3 / 413
    │   └── UnsupportedMediaType    exit 3 / 415
    ├── Unauthorized                exit 3 / 401
    ├── NotReady                    exit 2 / 503   a server or endpoint is unreachable or unhealthy
    └── GateFailed                  exit 1 / 422   a metric or latency check failed

Messages say what was wrong and how to fix it; they never carry credentials.

`mlpipe retrain` (and `mlpipe train` for a failed notebook) also exit with an outcome that is not an
error: 0 skipped (nothing to do), 10 promoted, 11 rejected by the gate, 12 deploy failed (the alias
was put back), 13 a notebook failed (the version is kept); see RETRAIN_EXIT. `mlpipe monitor` exits 0
when every alert is quiet and 14 when one is firing; see MONITOR_EXIT.
"""
from __future__ import annotations


RETRAIN_EXIT = {"skipped": 0, "promoted": 10, "rejected": 11, "deploy_failed": 12, "notebook_failed": 13}
MONITOR_EXIT = {"healthy": 0, "firing": 14}


class MlpipeError(Exception):
    exit_code = 1
    http_status = 500

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(MlpipeError):
    exit_code = 3
    http_status = 400


class SpecError(MlpipeError):
    exit_code = 3
    http_status = 400


class DataError(MlpipeError):
    exit_code = 4
    http_status = 400


class NotFound(MlpipeError):
    exit_code = 5
    http_status = 404


class IntegrityError(MlpipeError):
    exit_code = 6
    http_status = 409


class LibraryMismatch(MlpipeError):
    exit_code = 9
    http_status = 409


class RegistryError(MlpipeError):
    exit_code = 7
    http_status = 503


class Conflict(RegistryError):
    http_status = 409


class Locked(MlpipeError):
    exit_code = 8
    http_status = 423


class ValidationError(MlpipeError):
    exit_code = 3
    http_status = 400


class PayloadTooLarge(ValidationError):
    http_status = 413


class UnsupportedMediaType(ValidationError):
    http_status = 415


class Unauthorized(MlpipeError):
    exit_code = 3
    http_status = 401


class NotReady(MlpipeError):
    exit_code = 2
    http_status = 503


class GateFailed(MlpipeError):
    exit_code = 1
    http_status = 422
