"""Thin gRPC servicers: validate the request's shape, delegate to the coordinator's parts, convert at the edge."""

from __future__ import annotations

import asyncio

import grpc
import structlog

from distinfer.common.errors import JOB_ID_KEY, DistinferError, InvalidArgument, grpc_errors
from distinfer.coordinator import input_chunks
from distinfer.coordinator.job import MESSAGE_LIMIT
from distinfer.coordinator.jobs import JobManager
from distinfer.coordinator.listing import list_page
from distinfer.coordinator.result_streams import ResultStreams
from distinfer.coordinator.uploads import Uploads
from distinfer.coordinator.watchdog import ProgressWatchdog
from distinfer.coordinator.work_handout import WorkHandout
from distinfer.v1 import jobs_pb2, jobs_pb2_grpc, workers_pb2, workers_pb2_grpc

log = structlog.get_logger(__name__)

# The methods whose handler gets its request's Arrow bytes as a view of the bytes received (wire.WithPayload).
ZERO_COPY_PAYLOADS = {"/distinfer.v1.Workers/ReportResults": workers_pb2.ReportResultsRequest.ARROW_FIELD_NUMBER}


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    def __init__(self, manager: JobManager, uploads: Uploads, streams: ResultStreams):
        self.manager = manager
        self.uploads = uploads
        self.streams = streams

    @grpc_errors
    async def SubmitJob(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("spec"):
            raise InvalidArgument("the first SubmitJob message must carry the job's spec")

        async def row_batches():
            """The rows up to `end`. Anything else ends the upload with an error, and nothing of it is kept."""
            received = 0
            async for message in request_iterator:
                kind = message.WhichOneof("payload")
                if kind == "rows":
                    rows = input_chunks.upload_table(message.rows, received) if message.rows.arrow else message.rows
                    received += input_chunks.count(rows)
                    yield rows
                elif kind == "end":
                    if message.end.HasField("num_rows") and message.end.num_rows != received:
                        raise InvalidArgument(
                            f"the end message counts {message.end.num_rows} rows but {received} arrived: the upload "
                            "was dropped, send it again"
                        )
                    return  # whole: a cancel that comes after this does not undo it
                elif kind == "abandon":
                    raise DistinferError(
                        f"the client abandoned the upload: {message.abandon[:MESSAGE_LIMIT]}", grpc.StatusCode.CANCELLED
                    )
                elif kind == "spec":
                    raise InvalidArgument("only the first SubmitJob message may carry a spec; the rest carry rows")
                else:
                    raise InvalidArgument("a SubmitJob message carries nothing: after the spec come rows, then end")
            # A closed stream and a cancelled call can look the same here, so only `end` makes an upload whole.
            raise InvalidArgument(
                f"the upload stopped after {received} rows without its end message, so it may have been cut off: "
                'it was dropped; finish the stream with {"end": {}}'
            )

        async def accepted(job_id: str) -> None:
            await context.send_initial_metadata(((JOB_ID_KEY, job_id),))

        job = await self.uploads.submit(first.spec, row_batches(), accepted)
        return jobs_pb2.SubmitJobResponse(job_id=job.job_id, num_rows=job.num_rows)

    @grpc_errors
    async def StreamResults(self, request, context):
        async for batch in self.streams.stream(request.job_id, request.start_index, request.format):
            yield batch

    @grpc_errors
    async def GetJob(self, request, context):
        return self.manager.job(request.job_id).to_status()

    @grpc_errors
    async def WatchJob(self, request, context):
        async for status in self.manager.watch(request.job_id):
            yield status

    @grpc_errors
    async def ListJobs(self, request, context):
        return list_page(self.manager.jobs.values(), request)

    @grpc_errors
    async def CancelJob(self, request, context):
        return (await self.manager.cancel(request.job_id)).to_status()

    @grpc_errors
    async def DeleteJob(self, request, context):
        await self.manager.delete(request.job_id)
        return jobs_pb2.DeleteJobResponse()

    @grpc_errors
    async def ListWorkers(self, request, context):
        return jobs_pb2.ListWorkersResponse(workers=self.manager.registry.to_pb())


class WorkersServicer(workers_pb2_grpc.WorkersServicer):
    def __init__(
        self, manager: JobManager, handout: WorkHandout, watchdog: ProgressWatchdog, heartbeat_interval_s: float
    ):
        self.manager = manager
        self.handout = handout
        self.watchdog = watchdog
        self.registry = manager.registry
        self.heartbeat_interval_s = heartbeat_interval_s

    @grpc_errors
    async def RegisterWorker(self, request, context):
        if not request.slots:
            raise InvalidArgument("a worker must offer at least one slot")
        if not request.advertise_host:
            raise InvalidArgument("a worker must advertise the address its rendezvous port is reached at")
        if not 0 < request.port_lo <= request.port_hi < 65536:
            raise InvalidArgument(f"bad rendezvous port range {request.port_lo}-{request.port_hi}")
        worker = self.registry.register(request)
        log.info(
            "worker_registered",
            worker_id=worker.worker_id,
            host=worker.advertise_host,
            slots=[s.device for s in request.slots],
        )
        return workers_pb2.RegisterWorkerResponse(
            worker_id=worker.worker_id, heartbeat_interval_s=self.heartbeat_interval_s
        )

    async def Connect(self, request_iterator, context):
        """The control stream. Its end, or missed heartbeats, means the worker is gone."""
        try:
            first = await anext(aiter(request_iterator), None)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken first message: the stream cannot start
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the first control message is unusable: {exc}")
        worker = self.registry.get(first.worker_id) if first else None
        if worker is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown worker id: register again")
        if worker.outbox is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker already has a control stream")
        outbox: asyncio.Queue = asyncio.Queue()
        worker.outbox = outbox
        await self._handle(worker, first)

        async def read_inbound():
            try:
                async for message in request_iterator:
                    await self._handle(worker, message)
            except Exception as exc:  # noqa: BLE001 - any read error ends the stream like a disconnect
                log.info("control_stream_read_failed", worker_id=worker.worker_id, error=repr(exc))
            finally:
                outbox.put_nowait(None)

        reader = asyncio.create_task(read_inbound())
        try:
            while (message := await outbox.get()) is not None:
                yield message
        finally:
            reason = worker.lost_reason or "control stream closed"
            reader.cancel()
            if self.registry.get(worker.worker_id) is worker:
                worker.outbox = None
                log.warning("worker_lost", worker_id=worker.worker_id, reason=reason)
                await self.manager.worker_lost(worker.worker_id, reason)

    async def _handle(self, worker, message: workers_pb2.WorkerMessage) -> None:
        kind = message.WhichOneof("payload")
        if kind == "heartbeat":
            # Waking the scheduler on every heartbeat had it list every free slot of the fleet a thousand times
            # a second while a job waited: only a slot that became (un)healthy is news to it.
            if self.registry.heartbeat(worker, message.heartbeat):
                self.manager.wake()
            self.watchdog.note_progress(worker.worker_id, message.heartbeat.progress)
        elif kind == "event":
            await self.manager.slot_event(worker.worker_id, message.event)

    @grpc_errors
    async def FetchShard(self, request, context):
        if request.world_size < 1 or request.rank >= request.world_size:
            raise InvalidArgument(f"rank {request.rank} is outside a world of {request.world_size}")
        async for batch in self.handout.shard(request):
            yield batch

    @grpc_errors
    async def FetchWork(self, request, context):
        return await self.handout.fetch_work(request)

    @grpc_errors
    async def ReportResults(self, request_iterator, context):
        committed = 0
        async for report in request_iterator:  # wire.WithPayload: the Arrow bytes as received (ZERO_COPY_PAYLOADS)
            message = report.message
            if not message.job_id:
                raise InvalidArgument("ReportResults needs a job id")
            if message.splits_written:
                committed += await self.manager.commit_splits(message.job_id, message.attempt, message.splits_written)
            else:
                committed += await self.manager.commit(message.job_id, message.attempt, report.payload)
        return workers_pb2.ReportResultsResponse(committed=committed)
