"""The SQS receiver: S3 event notifications from a queue found by name, received in batches of up
to ten with long polling, deleted only when the watcher says their events are enqueued.

The client is boto3's, configured the usual way (AWS_* variables, profiles, roles;
AWS_ENDPOINT_URL_SQS for a local server such as moto's).
"""

import logging
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from imagemill.core.errors import UserError

# the SQS client and its messages as boto3 makes them (the project installs type stubs for S3 only)
SQSClient = Any
Message = dict[str, Any]

log = logging.getLogger(__name__)

SCHEME = "sqs://"
MAX_MESSAGES = 10  # the most one ReceiveMessage returns
LONG_POLL_S = 10  # at most 20; shorter so a stopping watcher notices within this


def queue_name(source: str) -> str:
    """`sqs://NAME` -> NAME; UserError for anything else."""
    name = source.removeprefix(SCHEME)
    if not source.startswith(SCHEME) or not name or "/" in name:
        raise UserError(f"source {source}: expected sqs://QUEUE_NAME")
    return name


@dataclass
class SqsReceiver:
    """One queue's messages. `visibility_timeout`: how long a received message stays hidden from
    other receivers; one not deleted by then (its watcher died) is delivered again."""

    name: str
    visibility_timeout: int
    client: SQSClient = field(default_factory=lambda: boto3.client("sqs"), repr=False)
    url: str = field(init=False)

    def __post_init__(self) -> None:
        try:
            self.url = self.client.get_queue_url(QueueName=self.name)["QueueUrl"]
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if "NonExistentQueue" in code or "QueueDoesNotExist" in code:
                raise UserError(f"source {SCHEME}{self.name}: no such SQS queue") from None
            raise UserError(f"source {SCHEME}{self.name}: {code} {error.get('Message', '')}".strip()) from None
        except BotoCoreError as exc:
            raise UserError(f"source {SCHEME}{self.name}: cannot reach SQS ({exc})") from None

    def receive(self, wait_s: int = LONG_POLL_S) -> list[Message]:
        """Up to ten messages, waiting up to `wait_s` seconds (0..20) for the first."""
        reply = self.client.receive_message(
            QueueUrl=self.url,
            MaxNumberOfMessages=MAX_MESSAGES,
            WaitTimeSeconds=max(0, min(20, wait_s)),
            VisibilityTimeout=self.visibility_timeout,
        )
        return list(reply.get("Messages", []))

    def delete(self, messages: list[Message]) -> int:
        """Delete handled messages, ten per call; how many SQS refused (those come back after the
        visibility timeout, and their events find their records written: nothing is done twice)."""
        refused = 0
        for start in range(0, len(messages), MAX_MESSAGES):
            entries = [
                {"Id": str(index), "ReceiptHandle": message["ReceiptHandle"]}
                for index, message in enumerate(messages[start : start + MAX_MESSAGES])
            ]
            reply = self.client.delete_message_batch(QueueUrl=self.url, Entries=entries)
            for failed in reply.get("Failed", []):
                log.warning("SQS kept message %s: %s", failed.get("Id"), failed.get("Message", failed.get("Code")))
                refused += 1
        return refused
