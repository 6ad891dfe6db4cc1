//! C ABI over the transfer agent (filled by a later issue).
