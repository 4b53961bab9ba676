"""moto's S3 server on a free loopback port, with one bucket, as the storage of S3 tests."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, NamedTuple


class S3Server(NamedTuple):
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    client: Any  # boto3 S3 client

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def uri(self, key: str, bucket: str | None = None) -> str:
        """pyarrow URI of s3://BUCKET/KEY with credentials, endpoint, scheme and region in it, so Ray
        workers started before the server reach it without env vars."""
        return (f"s3://testing:testing@{bucket or self.bucket}/{key}"
                f"?endpoint_override=127.0.0.1:{self.port}&scheme=http&region=us-east-1")

    def keys(self, prefix: str, bucket: str | None = None) -> list[str]:
        """The keys of the objects under `prefix`."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket or self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


# What a process (the MLflow server) needs in its environment to reach the server with boto3.
def client_env(server: S3Server) -> dict[str, str]:
    return {"MLFLOW_S3_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def moto_s3(bucket: str = "lfb-it") -> Iterator[S3Server]:
    """moto's threaded S3 server on 127.0.0.1 with `bucket` created; stopped after the block.
    The caller sets AWS_EC2_METADATA_DISABLED, so no client asks an instance-metadata address."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        _, port = server.get_host_and_port()
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=bucket)
        yield S3Server(endpoint, bucket, client)
    finally:
        server.stop()
