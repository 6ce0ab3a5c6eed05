"""The GraphQL surface (strawberry)."""
