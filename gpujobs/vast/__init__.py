"""Async client for the Vast.ai REST API, its records, errors and offer query language."""

from gpujobs.vast import errors
from gpujobs.vast.client import DEFAULT_URL, VastClient, find_api_key
from gpujobs.vast.query import parse_order, parse_query
from gpujobs.vast.records import Instance, Offer

__all__ = [
    "DEFAULT_URL", "Instance", "Offer", "VastClient", "errors", "find_api_key", "parse_order",
    "parse_query",
]
