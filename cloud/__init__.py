"""The reference Tapshare cloud: REST API for dispensers, phones and operators (FastAPI + SQLAlchemy)."""
