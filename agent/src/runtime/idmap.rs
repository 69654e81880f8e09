//! Idmapped bind mounts for app volumes (being written).
