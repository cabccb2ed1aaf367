"""Upload events: S3 event notifications as they arrive from SQS or from an S3 server's webhook.

`s3_events` reads the event JSON both deliver; `sqs` and `webhook` receive it; `imagemill.producer.watch`
turns the events into chunks and marks.
"""
