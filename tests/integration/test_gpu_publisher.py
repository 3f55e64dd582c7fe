"""The worker side over a real nats-server: report_gpus and WorkerPublisher.publish_gpu."""

from __future__ import annotations

import asyncio

import nats
import pynvml
import pytest

import fleet_protocol as protocol
from fleet_protocol import GpuReading, MessageRejected
from fleet_worker.nvml_sampler import NvmlGpuSource, report_gpus
from fleet_worker.publisher import WorkerPublisher

from ..fake_nvml import FakeGpu, FakeNvml, RecordingLog

SUBJECT = "namespace.dynamo.component.backend.gpu_metrics"
UUID0 = "GPU-11111111-2222-3333-4444-555555555555"


async def test_report_gpus_publishes_each_interval_and_closes_nvml(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe(SUBJECT)
        nvml = FakeNvml([FakeGpu(UUID0)])
        source = NvmlGpuSource(nvml, visible_devices=None, logger=RecordingLog())
        stop = asyncio.Event()
        task = asyncio.create_task(report_gpus(WorkerPublisher(nc, worker_id=42), source, 0.05, stop,
                                               dp_rank=1, hostname="node-x"))
        messages = [await sub.next_msg(timeout=10) for _ in range(3)]
        stop.set()
        await asyncio.wait_for(task, 10)
        for message in messages:
            event = protocol.decode_gpu_metrics(message.data, 1 << 20)
            assert (event.worker_id, event.dp_rank, event.hostname, event.driver_version) == (42, 1, "node-x",
                                                                                              "570.133.20")
            assert [g.uuid for g in event.gpus] == [UUID0] and event.gpus[0].power_usage_w == 512.345
        assert nvml.initialised is False  # nvmlShutdown on stop
    finally:
        await nc.close()


async def test_a_host_without_a_driver_reports_the_reason(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe(SUBJECT)
        source = NvmlGpuSource(FakeNvml([], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED),
                               visible_devices=None, logger=RecordingLog())
        stop = asyncio.Event()
        task = asyncio.create_task(report_gpus(WorkerPublisher(nc, worker_id=7), source, 0.05, stop))
        event = protocol.decode_gpu_metrics((await sub.next_msg(timeout=10)).data, 1 << 20)
        stop.set()
        await asyncio.wait_for(task, 10)
        assert event.gpus == [] and event.sampler_error == "NVMLError_DriverNotLoaded"
    finally:
        await nc.close()


async def test_publish_gpu_refuses_what_the_aggregator_would_reject(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe(SUBJECT)
        publisher = WorkerPublisher(nc, worker_id=3)
        with pytest.raises(MessageRejected) as caught:
            await publisher.publish_gpu([GpuReading(0, "GPU-a", "A100", gpu_util=101)])
        assert caught.value.reason == "out_of_range"
        with pytest.raises(MessageRejected):
            await publisher.publish_gpu([GpuReading(0, "GPU-a", "A100"), GpuReading(0, "GPU-a", "A100")])
        await publisher.publish_gpu([GpuReading(0, "GPU-a", "A100", gpu_util=100)], hostname="h")
        event = protocol.decode_gpu_metrics((await sub.next_msg(timeout=10)).data, 1 << 20)
        assert event.gpus[0].gpu_util == 100  # the only message that went out
    finally:
        await nc.close()


async def test_report_gpus_skips_a_report_the_aggregator_would_reject_and_goes_on(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe(SUBJECT)

        class Flaky:
            blocking = False
            calls = 0

            def sample(self):
                from fleet_worker.nvml_sampler import GpuSnapshot

                self.calls += 1
                twice = [GpuReading(0, "GPU-a", "A100")] * (2 if self.calls == 1 else 1)  # first: inconsistent
                return GpuSnapshot(twice)

        stop = asyncio.Event()
        task = asyncio.create_task(report_gpus(WorkerPublisher(nc, worker_id=9), Flaky(), 0.05, stop))
        event = protocol.decode_gpu_metrics((await sub.next_msg(timeout=10)).data, 1 << 20)
        stop.set()
        await asyncio.wait_for(task, 10)
        assert len(event.gpus) == 1
    finally:
        await nc.close()
