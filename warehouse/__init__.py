"""The project's DuckDB warehouse (see :mod:`warehouse.db`)."""

from warehouse.db import (
    TABLES,
    connect,
    create_box_views,
    default_path,
    ensure_schema,
    open_with_retry,
    record_box_run,
    register_box_table,
    sql_string,
)

__all__ = [
    "TABLES",
    "connect",
    "create_box_views",
    "default_path",
    "ensure_schema",
    "open_with_retry",
    "record_box_run",
    "register_box_table",
    "sql_string",
]
