"""The link to the cloud (requests): signed client, command long-poll, outbox sender. Built in the sync issue."""
