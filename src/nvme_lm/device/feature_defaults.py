"""Which features this controller supports, their defaults and attributes (Get Features
SEL 3h), derived from the device model."""

from __future__ import annotations

from nvme_lm.device.features import FeatureSpec
from nvme_lm.device.model import DeviceModel

ARBITRATION = 0x01
POWER_MANAGEMENT = 0x02
TEMPERATURE_THRESHOLD = 0x04
VOLATILE_WRITE_CACHE = 0x06
NUMBER_OF_QUEUES = 0x07
INTERRUPT_COALESCING = 0x08
INTERRUPT_VECTOR_CONFIG = 0x09
WRITE_ATOMICITY = 0x0A
ASYNC_EVENT_CONFIG = 0x0B
TIMESTAMP = 0x0E
KEEP_ALIVE_TIMER = 0x0F


def default_feature_specs(model: DeviceModel) -> dict[int, FeatureSpec]:
    nq = model.max_io_queues - 1
    specs = [
        FeatureSpec(ARBITRATION, 0x3),  # round robin, burst 2^3
        FeatureSpec(POWER_MANAGEMENT, 0x0),
        FeatureSpec(TEMPERATURE_THRESHOLD, 0x0157),  # 343 K over-temperature threshold, sensor 0
        FeatureSpec(VOLATILE_WRITE_CACHE, 0x1),
        FeatureSpec(NUMBER_OF_QUEUES, nq | nq << 16, saveable=False),
        FeatureSpec(INTERRUPT_COALESCING, 0x0),
        FeatureSpec(INTERRUPT_VECTOR_CONFIG, 0x0),
        FeatureSpec(WRITE_ATOMICITY, 0x0),
        FeatureSpec(ASYNC_EVENT_CONFIG, 0x0),
        FeatureSpec(TIMESTAMP, 0x0, saveable=False),
        FeatureSpec(KEEP_ALIVE_TIMER, 0x0, saveable=False),
    ]
    return {s.fid: s for s in specs}
