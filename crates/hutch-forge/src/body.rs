//! The pull request body and the comment: the run summary, the diffstat, and what was held back.
