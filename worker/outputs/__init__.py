"""Copy-out: completed jobs' output images copied to storage we own, before the provider
deletes them (WaveSpeed keeps outputs about 7 days; its URLs are temporary).

Off unless KQ_OUTPUTS names a place (`kq up` / `kq run` default to var/outputs). With it
on, the move that completes a job also puts it on kq:outputs:due (lua/transition.lua, in
the same atomic step, so the trigger cannot be lost); `kq.copy_outputs`, scheduled by
beat every second, copies from there. The job's result event goes out first, untouched;
a second event, `type` "outputs", follows once its copy-out settles (docs/events.md).

    storage   the Storage protocol and the local-directory backend
    backends  open_storage(url): the backend KQ_OUTPUTS names
    s3        the S3-compatible backend (boto3)
    fetch     one bounded, checked download; CopyError and its reason codes
    records   the Redis side: claim, record once, retry; what status and `kq job` read
    copier    the sweep: claim, copy on a thread pool, settle or reschedule
"""

from worker.outputs.backends import open_storage
from worker.outputs.copier import Copier, CopyReport, make_copier
from worker.outputs.fetch import CopyError
from worker.outputs.records import OutputsRecord, OutputsStore, read_backlog, read_record
from worker.outputs.storage import LocalStorage, Storage, StorageError

__all__ = [
    "Copier",
    "CopyError",
    "CopyReport",
    "LocalStorage",
    "OutputsRecord",
    "OutputsStore",
    "Storage",
    "StorageError",
    "make_copier",
    "open_storage",
    "read_backlog",
    "read_record",
]
