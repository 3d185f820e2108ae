import Foundation

/// The rows and command tag of one statement's result, copied out of libpq's PGresult.
public struct PostgresRows: Sendable {
    public let columns: [String]
    public let rows: [PostgresRow]
    /// The command tag, e.g. `INSERT 0 1`, `COMMIT`, `ROLLBACK`.
    public let commandTag: String
    /// Rows affected by INSERT/UPDATE/DELETE (PQcmdTuples), 0 otherwise.
    public let affectedRows: Int

    public var first: PostgresRow? { rows.first }
}

/// One row. Values are kept in PostgreSQL's text format and decoded on demand with type checks.
public struct PostgresRow: Sendable {
    let layout: ColumnLayout
    let values: [String?]

    final class ColumnLayout: Sendable {
        let names: [String]
        let typeOIDs: [UInt32]
        let indexByName: [String: Int]

        init(names: [String], typeOIDs: [UInt32]) {
            self.names = names
            self.typeOIDs = typeOIDs
            var index: [String: Int] = [:]
            for (position, name) in names.enumerated() where index[name] == nil {
                index[name] = position
            }
            self.indexByName = index
        }
    }

    /// Decodes column `index`; throws `.decoding` on NULL or a type mismatch.
    public func decode<T: PostgresDecodable>(_ type: T.Type, at index: Int) throws -> T {
        guard let value = try decodeIfPresent(type, at: index) else {
            throw PostgresError(code: .decoding, message: "column \(layout.names[index]) is NULL, expected \(T.self)")
        }
        return value
    }

    /// Decodes column `name`; throws `.decoding` on NULL, a type mismatch or an unknown column.
    public func decode<T: PostgresDecodable>(_ type: T.Type, _ name: String) throws -> T {
        try decode(type, at: try index(of: name))
    }

    /// Decodes column `index`, answering nil for SQL NULL.
    public func decodeIfPresent<T: PostgresDecodable>(_ type: T.Type, at index: Int) throws -> T? {
        guard index >= 0, index < values.count else {
            throw PostgresError(code: .decoding, message: "column index \(index) out of range 0..<\(values.count)")
        }
        let oid = layout.typeOIDs[index]
        guard T.acceptsTypeOID(oid) else {
            throw PostgresError(
                code: .decoding, message: "column \(layout.names[index]) has type oid \(oid), not decodable as \(T.self)")
        }
        guard let text = values[index] else { return nil }
        guard let value = T(postgresText: text) else {
            throw PostgresError(code: .decoding, message: "column \(layout.names[index]) is not a valid \(T.self)")
        }
        return value
    }

    /// Decodes column `name`, answering nil for SQL NULL.
    public func decodeIfPresent<T: PostgresDecodable>(_ type: T.Type, _ name: String) throws -> T? {
        try decodeIfPresent(type, at: try index(of: name))
    }

    private func index(of name: String) throws -> Int {
        guard let index = layout.indexByName[name] else {
            throw PostgresError(code: .decoding, message: "no column named \(name)")
        }
        return index
    }
}

/// A Swift type that can be read from a column in PostgreSQL's text output format.
public protocol PostgresDecodable: Sendable {
    init?(postgresText: String)
    /// Whether a column of this type OID holds values of this Swift type.
    static func acceptsTypeOID(_ oid: UInt32) -> Bool
}

enum PostgresTypeOID {
    static let bool: UInt32 = 16
    static let bytea: UInt32 = 17
    static let int8: UInt32 = 20
    static let int2: UInt32 = 21
    static let int4: UInt32 = 23
}

extension Int64: PostgresDecodable {
    public init?(postgresText: String) { self.init(postgresText) }
    public static func acceptsTypeOID(_ oid: UInt32) -> Bool {
        oid == PostgresTypeOID.int8 || oid == PostgresTypeOID.int4 || oid == PostgresTypeOID.int2
    }
}

extension Int32: PostgresDecodable {
    public init?(postgresText: String) { self.init(postgresText) }
    public static func acceptsTypeOID(_ oid: UInt32) -> Bool {
        oid == PostgresTypeOID.int4 || oid == PostgresTypeOID.int2
    }
}

extension Int: PostgresDecodable {
    public init?(postgresText: String) { self.init(postgresText) }
    public static func acceptsTypeOID(_ oid: UInt32) -> Bool { Int64.acceptsTypeOID(oid) }
}

extension Bool: PostgresDecodable {
    public init?(postgresText: String) {
        switch postgresText {
        case "t": self = true
        case "f": self = false
        default: return nil
        }
    }
    public static func acceptsTypeOID(_ oid: UInt32) -> Bool { oid == PostgresTypeOID.bool }
}

extension String: PostgresDecodable {
    public init?(postgresText: String) { self = postgresText }
    /// Every type has a text form; bytea is excluded so that binary data is never read as text by mistake.
    public static func acceptsTypeOID(_ oid: UInt32) -> Bool { oid != PostgresTypeOID.bytea }
}

extension Data: PostgresDecodable {
    /// bytea's text output is `\x` followed by two hex digits a byte.
    public init?(postgresText: String) {
        let utf8 = Array(postgresText.utf8)
        guard utf8.count >= 2, utf8[0] == UInt8(ascii: "\\"), utf8[1] == UInt8(ascii: "x"), utf8.count % 2 == 0 else {
            return nil
        }
        var bytes = [UInt8]()
        bytes.reserveCapacity((utf8.count - 2) / 2)
        var position = 2
        while position < utf8.count {
            guard let high = hexValue(utf8[position]), let low = hexValue(utf8[position + 1]) else { return nil }
            bytes.append(high << 4 | low)
            position += 2
        }
        self.init(bytes)
    }
    public static func acceptsTypeOID(_ oid: UInt32) -> Bool { oid == PostgresTypeOID.bytea }
}

private func hexValue(_ byte: UInt8) -> UInt8? {
    switch byte {
    case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
    case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
    case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
    default: return nil
    }
}
