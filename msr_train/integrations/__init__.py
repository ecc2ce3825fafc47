"""msr-train's methods inside other training frameworks (each an optional extra)."""
