"""The supervisor: one asyncio process that owns every side effect of one journal."""
