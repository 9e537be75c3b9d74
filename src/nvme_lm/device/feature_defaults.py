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

# Temperature Threshold (FID 04h): the sensors that exist, and their default thresholds (Kelvin).
# The SMART / Health log reports the composite temperature and Temperature Sensor 1.
TEMPERATURE_SENSORS = (0, 1)  # TMPSEL 0 = composite, 1 = sensor 1
TMPSEL_ALL = 0xF
THSEL_OVER = 0
THSEL_UNDER = 1
COMPOSITE_TEMPERATURE_K = 313  # the emulated drive runs at 40 degrees C
WARNING_COMPOSITE_TEMPERATURE_K = 343  # Identify WCTEMP


def default_temperature_threshold(tmpsel: int, thsel: int) -> int:
    """Over: WCTEMP for the composite sensor, FFFFh for the others; under: 0 K."""
    if thsel == THSEL_UNDER:
        return 0
    return WARNING_COMPOSITE_TEMPERATURE_K if tmpsel == 0 else 0xFFFF


def default_feature_specs(model: DeviceModel) -> dict[int, FeatureSpec]:
    nq = model.max_io_queues - 1
    specs = [
        FeatureSpec(ARBITRATION, 0x3),  # round robin, burst 2^3
        FeatureSpec(POWER_MANAGEMENT, 0x0),
        FeatureSpec(TEMPERATURE_THRESHOLD, WARNING_COMPOSITE_TEMPERATURE_K),  # per sensor: see FeatureState.indexed
        FeatureSpec(VOLATILE_WRITE_CACHE, 0x1),
        FeatureSpec(NUMBER_OF_QUEUES, nq | nq << 16, saveable=False),
        FeatureSpec(INTERRUPT_COALESCING, 0x0),
        FeatureSpec(INTERRUPT_VECTOR_CONFIG, 0x0),  # per vector; vector 0 always has CD=1
        FeatureSpec(WRITE_ATOMICITY, 0x0),
        FeatureSpec(ASYNC_EVENT_CONFIG, 0x0),
        FeatureSpec(TIMESTAMP, 0x0, saveable=False),
        FeatureSpec(KEEP_ALIVE_TIMER, 0x0, saveable=False),
    ]
    return {s.fid: s for s in specs}
