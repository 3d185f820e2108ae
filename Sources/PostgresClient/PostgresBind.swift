import Foundation

/// A value bound to a `$n` parameter. Statements are always parameterised: nothing is spliced into SQL text.
public enum PostgresBind: Sendable, Equatable {
    case null
    case int64(Int64)
    case int32(Int32)
    case string(String)
    case bool(Bool)
    /// bytea, sent in binary format so that NUL bytes and any other byte survive unchanged.
    case bytea(Data)
    /// JSON text; the server infers json or jsonb from the statement.
    case json(String)

    /// The type OID we announce; 0 lets the server infer it from the statement.
    var typeOID: UInt32 {
        switch self {
        case .null: return 0
        case .int64: return 20
        case .int32: return 23
        case .string: return 25
        case .bool: return 16
        case .bytea: return 17
        case .json: return 0
        }
    }

    /// 1 for binary (bytea), 0 for text.
    var format: Int32 {
        if case .bytea = self { return 1 }
        return 0
    }

    /// The bytes sent on the wire, or nil for SQL NULL.
    var wireBytes: [UInt8]? {
        switch self {
        case .null: return nil
        case .int64(let value): return Array(String(value).utf8)
        case .int32(let value): return Array(String(value).utf8)
        case .string(let value): return Array(value.utf8)
        case .bool(let value): return Array((value ? "t" : "f").utf8)
        case .bytea(let value): return Array(value)
        case .json(let value): return Array(value.utf8)
        }
    }
}

extension PostgresBind: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByBooleanLiteral,
    ExpressibleByNilLiteral
{
    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int64) { self = .int64(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(nilLiteral: ()) { self = .null }
}
