"""What every danlu optimizer shares: the base class, validation and the shared math."""
