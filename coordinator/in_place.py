"""Jobs whose dataset is read and written in place: the coordinator records the dataset's manifest (files,
splits, row counts), hands splits to ranks and records which splits have their output part written. No row
passes through it, so its memory and CPU grow with the splits, not the rows.

Only the manifest (file listings and Parquet footers; one read of a JSONL file to find its line boundaries)
and the output's claim and _SUCCESS.json are read or written here, each in a thread of its own, never on the
event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses

from distinfer.common.dataset_parts import claim_output, finish_output, part_name
from distinfer.common.datasets import build_manifest
from distinfer.common.errors import InvalidArgument
from distinfer.common.filesystems import DatasetError
from distinfer.v1 import jobs_pb2, workers_pb2

DEFAULT_TEXT_FIELD = "text"


def reads_in_place(spec: jobs_pb2.JobSpec) -> bool:
    return bool(spec.dataset.input)


def check_dataset(dataset: jobs_pb2.Dataset) -> None:
    if not dataset.output:
        raise InvalidArgument(
            f"dataset.input {dataset.input} is read in place, so its results are written in place too: name the "
            "folder or prefix that gets them (dataset.output; --output on the command line)"
        )
    if dataset.format not in ("", "parquet", "jsonl"):
        raise InvalidArgument(f"unknown dataset format {dataset.format!r}: choose parquet or jsonl")


async def plan(job_id: str, dataset: jobs_pb2.Dataset) -> list[workers_pb2.DatasetSplit]:
    """The dataset's splits, once the output location is claimed for this job. Errors a user can act on (a
    missing path, credentials, a missing text column, an output holding another job's) are INVALID_ARGUMENT."""
    try:
        splits = await asyncio.to_thread(
            build_manifest, dataset.input, dataset.text_field or DEFAULT_TEXT_FIELD, dataset.format or None
        )
        if not sum(s.num_rows for s in splits):  # before the claim: a refused job must leave the output free
            raise InvalidArgument(f"the dataset {dataset.input} has no rows")
        await asyncio.to_thread(claim_output, dataset.output, job_id)
    except DatasetError as exc:
        raise InvalidArgument(str(exc)) from None
    except OSError as exc:  # what the storage said, when filesystems.translated could not tell more
        raise InvalidArgument(f"cannot read dataset {dataset.input}: {exc}") from None
    return [workers_pb2.DatasetSplit(number=i, **dataclasses.asdict(s)) for i, s in enumerate(splits)]


async def finish(job_id: str, dataset: jobs_pb2.Dataset, numbers: list[int], num_rows: int) -> None:
    """Write _SUCCESS.json: the parts in input order, for readers that want to know the output is whole."""
    await asyncio.to_thread(finish_output, dataset.output, job_id, [part_name(n) for n in numbers], num_rows)
