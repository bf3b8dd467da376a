//! switchyard middleware: under construction.
