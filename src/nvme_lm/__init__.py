"""nvme-lm: an emulated NVMe SSD with live-migration features and a VM migration engine."""
