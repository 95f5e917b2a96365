"""virtfreeze: freeze live libvirt/QEMU VMs for backups, merge them back after."""

__version__ = "0.1.0"
