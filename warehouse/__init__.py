"""The project's DuckDB warehouse (see :mod:`warehouse.db`)."""

from warehouse.db import (
    TABLES,
    RefusedQuery,
    WarehouseBusy,
    connect,
    create_box_views,
    default_path,
    ensure_schema,
    insert_arrow,
    open_with_retry,
    record_box_run,
    register_box_table,
    sandboxed_query,
    sql_string,
    transaction,
)

__all__ = [
    "TABLES",
    "RefusedQuery",
    "WarehouseBusy",
    "connect",
    "create_box_views",
    "default_path",
    "ensure_schema",
    "insert_arrow",
    "open_with_retry",
    "record_box_run",
    "register_box_table",
    "sandboxed_query",
    "sql_string",
    "transaction",
]
