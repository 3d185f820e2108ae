/// A JSON value as the client sent it. Numbers keep their exact text so that nothing is rounded through a Double:
/// money is decided on the lexeme (`1000` is an integer, `1000.0` and `1e3` are not).
public indirect enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    case number(String)
    case string(String)
    case array([JSONValue])
    /// Members in the order sent. Duplicate names are refused by the parser.
    case object([JSONMember])

    public subscript(key: String) -> JSONValue? {
        guard case .object(let members) = self else { return nil }
        return members.first { $0.key == key }?.value
    }
}

public struct JSONMember: Sendable, Equatable {
    public var key: String
    public var value: JSONValue

    public init(_ key: String, _ value: JSONValue) {
        self.key = key
        self.value = value
    }
}

// MARK: - Serialisation

extension JSONValue {
    /// Compact JSON: no insignificant whitespace, members in the order sent.
    public var compactText: String {
        var output: [UInt8] = []
        write(to: &output, sortedKeys: false)
        return String(decoding: output, as: UTF8.self)
    }

    /// Canonical JSON for fingerprints: compact, members sorted by name (byte order of their UTF-8), so key order
    /// and whitespace never change a fingerprint.
    public var canonicalText: String {
        var output: [UInt8] = []
        write(to: &output, sortedKeys: true)
        return String(decoding: output, as: UTF8.self)
    }

    func write(to output: inout [UInt8], sortedKeys: Bool) {
        switch self {
        case .null: output.append(contentsOf: "null".utf8)
        case .bool(let value): output.append(contentsOf: (value ? "true" : "false").utf8)
        case .number(let lexeme): output.append(contentsOf: lexeme.utf8)
        case .string(let value): JSONValue.writeString(value, to: &output)
        case .array(let elements):
            output.append(UInt8(ascii: "["))
            for (index, element) in elements.enumerated() {
                if index > 0 { output.append(UInt8(ascii: ",")) }
                element.write(to: &output, sortedKeys: sortedKeys)
            }
            output.append(UInt8(ascii: "]"))
        case .object(let members):
            let ordered = sortedKeys ? members.sorted { $0.key.utf8.lexicographicallyPrecedes($1.key.utf8) } : members
            output.append(UInt8(ascii: "{"))
            for (index, member) in ordered.enumerated() {
                if index > 0 { output.append(UInt8(ascii: ",")) }
                JSONValue.writeString(member.key, to: &output)
                output.append(UInt8(ascii: ":"))
                member.value.write(to: &output, sortedKeys: sortedKeys)
            }
            output.append(UInt8(ascii: "}"))
        }
    }

    /// Writes a JSON string literal: quotes, backslashes and control characters escaped, everything else as UTF-8.
    public static func writeString(_ value: String, to output: inout [UInt8]) {
        output.append(UInt8(ascii: "\""))
        for byte in value.utf8 {
            switch byte {
            case UInt8(ascii: "\""): output.append(contentsOf: "\\\"".utf8)
            case UInt8(ascii: "\\"): output.append(contentsOf: "\\\\".utf8)
            case 0x0A: output.append(contentsOf: "\\n".utf8)
            case 0x0D: output.append(contentsOf: "\\r".utf8)
            case 0x09: output.append(contentsOf: "\\t".utf8)
            case 0x08: output.append(contentsOf: "\\b".utf8)
            case 0x0C: output.append(contentsOf: "\\f".utf8)
            case 0x00..<0x20:
                let hex = Array("0123456789abcdef".utf8)
                output.append(contentsOf: "\\u00".utf8)
                output.append(hex[Int(byte >> 4)])
                output.append(hex[Int(byte & 0x0F)])
            default: output.append(byte)
            }
        }
        output.append(UInt8(ascii: "\""))
    }

    /// A JSON string literal for `value`, as text.
    public static func quoted(_ value: String) -> String {
        var output: [UInt8] = []
        writeString(value, to: &output)
        return String(decoding: output, as: UTF8.self)
    }

    /// Whether any string in this value (member names included) holds U+0000, which PostgreSQL's jsonb refuses.
    public var containsNUL: Bool {
        switch self {
        case .null, .bool, .number: return false
        case .string(let value): return value.utf8.contains(0)
        case .array(let elements): return elements.contains { $0.containsNUL }
        case .object(let members): return members.contains { $0.key.utf8.contains(0) || $0.value.containsNUL }
        }
    }
}

// MARK: - Numbers as PostgreSQL stores them

extension JSONValue {
    /// This value with every number written as the plain decimal PostgreSQL's jsonb stores and returns (`1e3` is
    /// `1000`, `1.50e1` is `15.0`, `-0` is `0`), or nil when a number's exponent is beyond `exponentMax`.
    ///
    /// Why: jsonb keeps numbers as `numeric` and prints them without exponents, so a 6-byte `1e9999` would be stored
    /// and returned as 10,000 bytes, and `1e200000` is beyond numeric's range altogether. Metadata limits must be
    /// measured on what is stored, and nothing the database would refuse may reach it.
    public func expandingNumbers(exponentMax: Int = 4096) -> JSONValue? {
        switch self {
        case .null, .bool, .string: return self
        case .number(let lexeme):
            return JSONValue.plainDecimal(lexeme, exponentMax: exponentMax).map { .number($0) }
        case .array(let elements):
            var expanded: [JSONValue] = []
            for element in elements {
                guard let value = element.expandingNumbers(exponentMax: exponentMax) else { return nil }
                expanded.append(value)
            }
            return .array(expanded)
        case .object(let members):
            var expanded: [JSONMember] = []
            for member in members {
                guard let value = member.value.expandingNumbers(exponentMax: exponentMax) else { return nil }
                expanded.append(JSONMember(member.key, value))
            }
            return .object(expanded)
        }
    }

    /// The plain decimal of a JSON number lexeme with numeric's scale: digits after the point =
    /// max(0, fraction digits - exponent).
    static func plainDecimal(_ lexeme: String, exponentMax: Int) -> String? {
        var bytes = Substring(lexeme).utf8[...]
        var negative = false
        if bytes.first == UInt8(ascii: "-") {
            negative = true
            bytes = bytes.dropFirst()
        }
        let mantissaEnd = bytes.firstIndex { $0 == UInt8(ascii: "e") || $0 == UInt8(ascii: "E") } ?? bytes.endIndex
        let mantissa = bytes[..<mantissaEnd]
        var exponent = 0
        if mantissaEnd != bytes.endIndex {
            let exponentText = String(decoding: bytes[bytes.index(after: mantissaEnd)...], as: UTF8.self)
            // A lexeme's exponent can be any length: compare its size before converting.
            let digits = exponentText.drop { $0 == "+" || $0 == "-" }.drop { $0 == "0" }
            guard digits.count <= 9, let value = Int(exponentText), abs(value) <= exponentMax else { return nil }
            exponent = value
        }
        let point = mantissa.firstIndex(of: UInt8(ascii: "."))
        let integerDigits = Array(mantissa[..<(point ?? mantissa.endIndex)])
        let fractionDigits = point.map { Array(mantissa[mantissa.index(after: $0)...]) } ?? []
        let digits = integerDigits + fractionDigits
        let scale = max(0, fractionDigits.count - exponent)
        let pointPosition = integerDigits.count + exponent  // digits before the decimal point, may be <= 0 or > count
        var integerPart: [UInt8]
        var fractionPart: [UInt8]
        if pointPosition <= 0 {
            integerPart = [UInt8(ascii: "0")]
            fractionPart = Array(repeating: UInt8(ascii: "0"), count: -pointPosition) + digits
        } else if pointPosition >= digits.count {
            integerPart = digits + Array(repeating: UInt8(ascii: "0"), count: pointPosition - digits.count)
            fractionPart = []
        } else {
            integerPart = Array(digits[..<pointPosition])
            fractionPart = Array(digits[pointPosition...])
        }
        // numeric's scale: pad or trim the fraction (trimmed digits are zeros: the scale is at least their count).
        if fractionPart.count < scale {
            fractionPart += Array(repeating: UInt8(ascii: "0"), count: scale - fractionPart.count)
        } else if fractionPart.count > scale {
            fractionPart = Array(fractionPart[..<scale])
        }
        while integerPart.count > 1, integerPart[0] == UInt8(ascii: "0") { integerPart.removeFirst() }
        let isZero = (integerPart + fractionPart).allSatisfy { $0 == UInt8(ascii: "0") }
        var text = (negative && !isZero) ? "-" : ""
        text += String(decoding: integerPart, as: UTF8.self)
        if !fractionPart.isEmpty { text += "." + String(decoding: fractionPart, as: UTF8.self) }
        return text
    }
}
