//! [`StoreError`]: what can go wrong in a store, classified by what the caller should do.

/// An error of a store operation.
///
/// [`StoreError::Unavailable`] is transient (the database cannot be reached, the disk is
/// full, a connection broke, the schema or a privilege is missing): a writer should keep the
/// events (spool them) and retry. The other kinds are not cured by retrying: when `apply`
/// fails with [`StoreError::Invalid`], a value of the batch cannot be stored (PostgreSQL
/// SQLSTATE classes 22 and 23, SQLite constraint and type errors), and the writer isolates
/// and dead-letters the events at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or written right now (connection or I/O problem).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data cannot be read back (a damaged file, or a row no spendguard wrote).
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    /// The database refused the data or the request (a constraint, a value out of range,
    /// a bad URL or schema).
    #[error("store refused the request: {0}")]
    Invalid(String),
    /// Another writer holds the single-writer lock.
    #[error("{0}")]
    Locked(String),
}

impl StoreError {
    /// A deadlock or a serialization failure (PostgreSQL SQLSTATE 40P01, 40001): the
    /// transaction was rolled back and may simply run again.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Unavailable(m) if m.ends_with("(40P01)") || m.ends_with("(40001)"))
    }

    /// True for errors a retry may cure ([`StoreError::Unavailable`]).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    pub(crate) fn locked(db: &str) -> StoreError {
        StoreError::Locked(format!(
            "another spendguard instance is writing to {db}; only one single-node instance may \
             run per database (several need mode = \"cluster\", on PostgreSQL)"
        ))
    }
}
