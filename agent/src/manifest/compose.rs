//! docker-compose import (being written).
