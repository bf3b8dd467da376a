//! switchyard transport (memory): under construction.
