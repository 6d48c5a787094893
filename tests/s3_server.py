"""A moto S3 server on 127.0.0.1 for tests (moto[server], a dev dependency): real HTTP, so other processes
(an MLflow server, a finetune driver and its Ray workers) reach it through ``AWS_ENDPOINT_URL_S3``."""

from __future__ import annotations

import logging

from pipelines.utils.ports import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


class S3Server:
    """``ThreadedMotoServer`` in this process, with ``buckets`` made; :attr:`env` points boto3 and pyarrow
    (and so Ray Train's storage) at it."""

    def __init__(self, *buckets: str) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": self.url}
        self.buckets = buckets
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port)

    def start(self) -> S3Server:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server.start()
        for bucket in self.buckets:
            self.client().create_bucket(Bucket=bucket)
        return self

    def stop(self) -> None:
        self._server.stop()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=CREDENTIALS["AWS_REGION"],
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]
